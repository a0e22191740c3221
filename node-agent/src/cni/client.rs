//! The plugin's side of the agent socket: blocking, because a CNI plugin is a short-lived
//! process that does one thing.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cni::api::{Request, Response};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the Weft agent is not answering on {path} ({source}); it may be starting or restarting, try again later")]
    Unreachable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the Weft agent on {path} broke off the exchange: {reason}")]
    Protocol { path: PathBuf, reason: String },
}

pub struct AgentClient {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl AgentClient {
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let unreachable = |source| ClientError::Unreachable {
            path: path.to_owned(),
            source,
        };
        let stream = UnixStream::connect(path).map_err(unreachable)?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(unreachable)?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(unreachable)?;
        let writer = stream.try_clone().map_err(unreachable)?;
        Ok(Self {
            path: path.to_owned(),
            reader: BufReader::new(stream),
            writer,
        })
    }

    pub fn call(&mut self, request: &Request) -> Result<Response, ClientError> {
        let protocol = |reason: String| ClientError::Protocol {
            path: self.path.clone(),
            reason,
        };
        let mut line = serde_json::to_vec(request).map_err(|e| protocol(e.to_string()))?;
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .map_err(|e| protocol(e.to_string()))?;
        let mut answer = String::new();
        let read = self
            .reader
            .read_line(&mut answer)
            .map_err(|e| protocol(e.to_string()))?;
        if read == 0 {
            return Err(protocol("the connection closed without an answer".into()));
        }
        serde_json::from_str(&answer).map_err(|e| protocol(format!("unreadable answer: {e}")))
    }
}
