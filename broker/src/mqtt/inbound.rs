use super::Frame;

/// A client packet that passed strict MQTT 3.1.1 validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    Connect {
        client_id: String,
        keep_alive: u16,
        clean_session: bool,
        will: Option<Will>,
    },
    Publish {
        topic: String,
        qos: u8,
        retain: bool,
        pkid: u16,
        payload_len: usize,
    },
    /// PUBACK, PUBREC, PUBREL or PUBCOMP.
    Ack {
        kind: AckKind,
        pkid: u16,
    },
    Subscribe {
        pkid: u16,
        filters: Vec<(String, u8)>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    Disconnect,
}

/// The four packets that acknowledge a step of a QoS 1 or 2 delivery, all
/// `type + packet id`; the type says which step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AckKind {
    PubAck,
    PubRec,
    PubRel,
    PubComp,
}

impl AckKind {
    /// The fixed header's first byte (PUBREL's carries its required flags).
    pub fn header(self) -> u8 {
        match self {
            AckKind::PubAck => PUBACK << 4,
            AckKind::PubRec => PUBREC << 4,
            AckKind::PubRel => (PUBREL << 4) | 0b0010,
            AckKind::PubComp => PUBCOMP << 4,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("packet type {0} may not be sent by a client")]
    UnexpectedType(u8),
    #[error("invalid fixed-header flags {flags:#06b} for packet type {kind}")]
    BadFlags { kind: u8, flags: u8 },
    #[error("packet is truncated")]
    Truncated,
    #[error("packet has {0} unexpected trailing bytes")]
    Trailing(usize),
    #[error("unsupported protocol {name:?} level {level}: only MQTT 3.1.1 is supported")]
    UnsupportedVersion { name: String, level: u8 },
    #[error("CONNECT reserved flag is set")]
    ReservedConnectFlag,
    #[error("CONNECT will flags are set without a will")]
    WillFlagsWithoutWill,
    #[error("CONNECT has a password without a user name")]
    PasswordWithoutUsername,
    #[error("QoS 3 is not a QoS")]
    BadQos,
    #[error("QoS 0 PUBLISH with the DUP flag")]
    DupOnQos0,
    #[error("packet identifier 0 is not allowed")]
    ZeroPacketId,
    #[error("string is not valid UTF-8")]
    BadUtf8,
    #[error("invalid topic name {0:?}")]
    BadTopic(String),
    #[error("invalid topic filter {0:?}")]
    BadFilter(String),
    #[error("SUBSCRIBE or UNSUBSCRIBE without any filter")]
    NoFilters,
    #[error("SUBSCRIBE requested-QoS byte {0:#04x} is invalid")]
    BadRequestedQos(u8),
    #[error("payload of {len} bytes exceeds the limit of {limit} bytes")]
    PayloadTooLarge { len: usize, limit: usize },
}

const CONNECT: u8 = 1;
const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const PUBREC: u8 = 5;
const PUBREL: u8 = 6;
const PUBCOMP: u8 = 7;
const SUBSCRIBE: u8 = 8;
const UNSUBSCRIBE: u8 = 10;
const PINGREQ: u8 = 12;
const DISCONNECT: u8 = 14;

/// Validates one frame strictly against MQTT 3.1.1 and extracts what the
/// edge needs to authorize it.
pub fn parse(frame: &Frame, max_payload: usize) -> Result<Inbound, ProtocolError> {
    let kind = frame.packet_type();
    let flags = frame.flags();
    let expect_flags = |want: u8| {
        if flags == want {
            Ok(())
        } else {
            Err(ProtocolError::BadFlags { kind, flags })
        }
    };
    let mut r = Reader::new(frame.body());
    let packet = match kind {
        CONNECT => {
            expect_flags(0)?;
            parse_connect(&mut r)?
        }
        PUBLISH => parse_publish(flags, &mut r, max_payload)?,
        PUBACK | PUBREC | PUBREL | PUBCOMP => {
            let ack = match kind {
                PUBACK => AckKind::PubAck,
                PUBREC => AckKind::PubRec,
                PUBREL => AckKind::PubRel,
                _ => AckKind::PubComp,
            };
            expect_flags(ack.header() & 0x0F)?;
            Inbound::Ack {
                kind: ack,
                pkid: r.pkid()?,
            }
        }
        SUBSCRIBE => {
            expect_flags(0b0010)?;
            let pkid = r.pkid()?;
            let mut filters = Vec::new();
            while !r.is_empty() {
                let filter = r.string()?;
                check_filter(&filter)?;
                let qos = r.u8()?;
                if qos > 2 {
                    return Err(ProtocolError::BadRequestedQos(qos));
                }
                filters.push((filter, qos));
            }
            if filters.is_empty() {
                return Err(ProtocolError::NoFilters);
            }
            Inbound::Subscribe { pkid, filters }
        }
        UNSUBSCRIBE => {
            expect_flags(0b0010)?;
            let pkid = r.pkid()?;
            let mut filters = Vec::new();
            while !r.is_empty() {
                let filter = r.string()?;
                check_filter(&filter)?;
                filters.push(filter);
            }
            if filters.is_empty() {
                return Err(ProtocolError::NoFilters);
            }
            Inbound::Unsubscribe { pkid, filters }
        }
        PINGREQ => {
            expect_flags(0)?;
            Inbound::PingReq
        }
        DISCONNECT => {
            expect_flags(0)?;
            Inbound::Disconnect
        }
        other => return Err(ProtocolError::UnexpectedType(other)),
    };
    r.finish()?;
    Ok(packet)
}

fn parse_connect(r: &mut Reader<'_>) -> Result<Inbound, ProtocolError> {
    let name = r.string()?;
    let level = r.u8()?;
    if name != "MQTT" || level != 4 {
        return Err(ProtocolError::UnsupportedVersion { name, level });
    }
    let flags = r.u8()?;
    if flags & 0x01 != 0 {
        return Err(ProtocolError::ReservedConnectFlag);
    }
    let clean_session = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    let has_password = flags & 0x40 != 0;
    let has_username = flags & 0x80 != 0;
    if !will_flag && (will_qos != 0 || will_retain) {
        return Err(ProtocolError::WillFlagsWithoutWill);
    }
    if will_qos == 3 {
        return Err(ProtocolError::BadQos);
    }
    if has_password && !has_username {
        return Err(ProtocolError::PasswordWithoutUsername);
    }
    let keep_alive = r.u16()?;
    let client_id = r.string()?;
    let will = if will_flag {
        let topic = r.string()?;
        check_topic(&topic)?;
        let payload = r.binary()?.to_vec();
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
        })
    } else {
        None
    };
    if has_username {
        r.string()?;
    }
    if has_password {
        r.binary()?;
    }
    Ok(Inbound::Connect {
        client_id,
        keep_alive,
        clean_session,
        will,
    })
}

fn parse_publish(
    flags: u8,
    r: &mut Reader<'_>,
    max_payload: usize,
) -> Result<Inbound, ProtocolError> {
    let dup = flags & 0b1000 != 0;
    let qos = (flags >> 1) & 0b11;
    let retain = flags & 0b0001 != 0;
    if qos == 3 {
        return Err(ProtocolError::BadQos);
    }
    if qos == 0 && dup {
        return Err(ProtocolError::DupOnQos0);
    }
    let topic = r.string()?;
    check_topic(&topic)?;
    let pkid = if qos > 0 { r.pkid()? } else { 0 };
    let payload_len = r.rest().len();
    if payload_len > max_payload {
        return Err(ProtocolError::PayloadTooLarge {
            len: payload_len,
            limit: max_payload,
        });
    }
    Ok(Inbound::Publish {
        topic,
        qos,
        retain,
        pkid,
        payload_len,
    })
}

/// Topic names: non-empty, no wildcards, no U+0000 (MQTT 3.1.1 §4.7).
pub(crate) fn check_topic(topic: &str) -> Result<(), ProtocolError> {
    if topic.is_empty() || topic.contains(['+', '#', '\0']) {
        return Err(ProtocolError::BadTopic(topic.to_owned()));
    }
    Ok(())
}

/// Topic filters: non-empty, `#` only as the whole last level, `+` only as a
/// whole level, no U+0000.
pub(crate) fn check_filter(filter: &str) -> Result<(), ProtocolError> {
    let bad = || ProtocolError::BadFilter(filter.to_owned());
    if filter.is_empty() || filter.contains('\0') {
        return Err(bad());
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let last = levels.peek().is_none();
        match level {
            "#" if last => {}
            "+" => {}
            l if l.contains(['+', '#']) => return Err(bad()),
            _ => {}
        }
    }
    Ok(())
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() < n {
            return Err(ProtocolError::Truncated);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, ProtocolError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn pkid(&mut self) -> Result<u16, ProtocolError> {
        match self.u16()? {
            0 => Err(ProtocolError::ZeroPacketId),
            id => Ok(id),
        }
    }

    fn binary(&mut self) -> Result<&'a [u8], ProtocolError> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }

    fn string(&mut self) -> Result<String, ProtocolError> {
        let bytes = self.binary()?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| ProtocolError::BadUtf8)
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    fn finish(self) -> Result<(), ProtocolError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtocolError::Trailing(self.buf.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::next_frame;
    use bytes::BytesMut;

    fn parse_bytes(bytes: &[u8]) -> Result<Inbound, ProtocolError> {
        let mut buf = BytesMut::from(bytes);
        let frame = next_frame(&mut buf, 1 << 20)
            .expect("frame")
            .expect("complete");
        parse(&frame, 1024)
    }

    fn connect(flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, flags, 0, 60];
        body.extend_from_slice(payload);
        let mut out = vec![0x10];
        crate::mqtt::encode_remaining_length(body.len(), &mut out);
        out.extend(body);
        out
    }

    #[test]
    fn a_plain_connect_parses() {
        let got = parse_bytes(&connect(0x02, &[0, 2, b'd', b'1'])).expect("valid");
        assert_eq!(
            got,
            Inbound::Connect {
                client_id: "d1".into(),
                keep_alive: 60,
                clean_session: true,
                will: None
            }
        );
    }

    #[test]
    fn connect_violations_are_refused() {
        let id = [0, 2, b'd', b'1'];
        assert_eq!(
            parse_bytes(&connect(0x03, &id)),
            Err(ProtocolError::ReservedConnectFlag)
        );
        assert_eq!(
            parse_bytes(&connect(0x42, &[0, 2, b'd', b'1', 0, 1, b'p'])),
            Err(ProtocolError::PasswordWithoutUsername)
        );
        assert_eq!(
            parse_bytes(&connect(0x22, &id)),
            Err(ProtocolError::WillFlagsWithoutWill)
        );
        let mut wrong_header = connect(0x02, &id);
        wrong_header[0] = 0x11;
        assert!(matches!(
            parse_bytes(&wrong_header),
            Err(ProtocolError::BadFlags { kind: 1, .. })
        ));
    }

    #[test]
    fn publish_topics_are_checked() {
        // topic "", "#", "a\0b"
        for topic in [&b""[..], b"#", b"a/+", b"a\0b"] {
            let mut p = vec![0x30, (2 + topic.len()) as u8, 0, topic.len() as u8];
            p.extend_from_slice(topic);
            assert!(
                matches!(parse_bytes(&p), Err(ProtocolError::BadTopic(_))),
                "{topic:?}"
            );
        }
        assert_eq!(
            parse_bytes(&[0x36, 5, 0, 1, b'a', 0, 1]),
            Err(ProtocolError::BadQos)
        );
        assert_eq!(
            parse_bytes(&[0x32, 5, 0, 1, b'a', 0, 0]),
            Err(ProtocolError::ZeroPacketId)
        );
        assert_eq!(
            parse_bytes(&[0x38, 3, 0, 1, b'a']),
            Err(ProtocolError::DupOnQos0)
        );
    }

    #[test]
    fn subscribe_rules() {
        // wrong flags
        assert!(matches!(
            parse_bytes(&[0x80, 6, 0, 1, 0, 1, b'a', 0]),
            Err(ProtocolError::BadFlags { kind: 8, .. })
        ));
        // a/#/b
        assert!(matches!(
            parse_bytes(&[0x82, 10, 0, 1, 0, 5, b'a', b'/', b'#', b'/', b'b', 0]),
            Err(ProtocolError::BadFilter(_))
        ));
        // no filters
        assert_eq!(parse_bytes(&[0x82, 2, 0, 1]), Err(ProtocolError::NoFilters));
        assert_eq!(
            parse_bytes(&[0x82, 6, 0, 1, 0, 1, b'#', 1]),
            Ok(Inbound::Subscribe {
                pkid: 1,
                filters: vec![("#".into(), 1)]
            })
        );
    }

    #[test]
    fn pingreq_with_a_body_is_refused() {
        assert_eq!(parse_bytes(&[0xC0, 1, 0]), Err(ProtocolError::Trailing(1)));
        assert_eq!(parse_bytes(&[0xC0, 0]), Ok(Inbound::PingReq));
    }

    #[test]
    fn server_only_packets_are_refused() {
        assert_eq!(
            parse_bytes(&[0x20, 2, 0, 0]),
            Err(ProtocolError::UnexpectedType(2))
        );
    }
}
