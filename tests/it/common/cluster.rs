//! Placeholder until the RabbitMQ fixture lands (branch clustertest).

use std::path::Path;

use serde_json::Value;

pub struct RabbitCluster;

impl RabbitCluster {
    pub fn up(_pki: &Path, _dir: &Path) -> Option<RabbitCluster> {
        None
    }
    pub fn sync(&self, _pki: &Path) -> Value {
        Value::Null
    }
    pub fn mqtts(&self) -> Vec<String> {
        Vec::new()
    }
}
