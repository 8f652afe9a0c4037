use bytes::{Bytes, BytesMut};

/// One complete MQTT control packet as it came off the wire.
#[derive(Debug, Clone)]
pub struct Frame {
    /// The first byte: packet type (high nibble) and flags (low nibble).
    pub header: u8,
    /// The whole packet, fixed header included (what rumqttd's decoder wants).
    pub raw: Bytes,
    /// Offset of the variable header inside `raw`.
    pub body_start: usize,
}

impl Frame {
    pub fn packet_type(&self) -> u8 {
        self.header >> 4
    }

    pub fn flags(&self) -> u8 {
        self.header & 0x0F
    }

    pub fn body(&self) -> &[u8] {
        &self.raw[self.body_start..]
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("malformed remaining length")]
    MalformedLength,
    #[error("packet of {declared} bytes exceeds the limit of {limit} bytes")]
    TooLarge { declared: usize, limit: usize },
}

/// Cuts the next frame off `buf` if it is complete.
///
/// The declared remaining length is checked against `max_frame` as soon as
/// the length bytes are in, so an oversized packet is refused before its
/// body is read.
pub fn next_frame(buf: &mut BytesMut, max_frame: usize) -> Result<Option<Frame>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let mut len: usize = 0;
    let mut shift = 0;
    let mut pos = 1;
    loop {
        let Some(&byte) = buf.get(pos) else {
            return Ok(None);
        };
        len |= usize::from(byte & 0x7F) << shift;
        pos += 1;
        if byte & 0x80 == 0 {
            break;
        }
        shift += 7;
        if pos > 4 {
            return Err(FrameError::MalformedLength);
        }
    }
    if len > max_frame {
        return Err(FrameError::TooLarge {
            declared: len,
            limit: max_frame,
        });
    }
    if buf.len() < pos + len {
        // Reserve now so the rest of the packet arrives without regrowing.
        buf.reserve(pos + len - buf.len());
        return Ok(None);
    }
    let header = buf[0];
    let raw = buf.split_to(pos + len).freeze();
    Ok(Some(Frame {
        header,
        raw,
        body_start: pos,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_for_a_whole_frame() {
        let mut buf = BytesMut::from(&[0x30u8, 0x05, 0, 1][..]);
        assert!(next_frame(&mut buf, 100).expect("valid").is_none());
        buf.extend_from_slice(&[b'a', 1, 2]);
        let frame = next_frame(&mut buf, 100).expect("valid").expect("complete");
        assert_eq!(frame.packet_type(), 3);
        assert_eq!(frame.body(), &[0, 1, b'a', 1, 2]);
        assert!(buf.is_empty());
    }

    #[test]
    fn refuses_oversized_before_reading_the_body() {
        // Declares 2 MiB, sends nothing else.
        let mut buf = BytesMut::from(&[0x30u8, 0x80, 0x80, 0x80, 0x01][..]);
        assert_eq!(
            next_frame(&mut buf, 1024).expect_err("must be refused"),
            FrameError::TooLarge {
                declared: 2 * 1024 * 1024,
                limit: 1024
            }
        );
    }

    #[test]
    fn refuses_a_fifth_length_byte() {
        let mut buf = BytesMut::from(&[0x30u8, 0xFF, 0xFF, 0xFF, 0xFF, 0x01][..]);
        assert_eq!(
            next_frame(&mut buf, usize::MAX).expect_err("must be refused"),
            FrameError::MalformedLength
        );
    }
}
