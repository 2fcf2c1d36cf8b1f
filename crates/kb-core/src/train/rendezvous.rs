//! How the nodes of a multi-node run meet: node 0 creates NCCL's unique id and hands it to the
//! other nodes, which is all NCCL needs to connect every GPU (NCCL then finds its own transport:
//! NVLink, InfiniBand, TCP sockets). Two ways, as torch.distributed offers:
//!
//! - `file:PATH` — node 0 writes the id to a path on a filesystem every node mounts; the others
//!   poll until it appears. The file must not exist when the run starts (node 0 refuses a stale
//!   one) and node 0 removes it when training ends.
//! - `tcp:HOST:PORT` — node 0 listens on `HOST:PORT` and sends the id to each node that connects.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Bytes that open every id exchanged over TCP, so that a stray connection is recognised.
const MAGIC: &[u8; 8] = b"KBRDZV01";

/// A rendezvous method (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rendezvous {
    /// A path on a shared filesystem.
    File(PathBuf),
    /// `host:port` where node 0 listens.
    Tcp(String),
}

impl Rendezvous {
    /// Parses `file:PATH` or `tcp:HOST:PORT`.
    pub fn parse(spec: &str) -> std::result::Result<Self, String> {
        if let Some(path) = spec.strip_prefix("file:") {
            if path.is_empty() {
                return Err("file: needs a path, e.g. file:/shared/run1.nccl-id".into());
            }
            return Ok(Rendezvous::File(PathBuf::from(path)));
        }
        if let Some(addr) = spec.strip_prefix("tcp:") {
            let ok = addr
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !ok {
                return Err(format!("`{addr}` is not HOST:PORT"));
            }
            return Ok(Rendezvous::Tcp(addr.to_string()));
        }
        Err(format!("`{spec}` is neither file:PATH nor tcp:HOST:PORT"))
    }

    /// Node 0: hands `id` to `peers` other nodes (returns once each has it, for TCP; once it is
    /// written, for a file).
    pub fn publish(&self, id: &[u8], peers: usize, timeout: Duration) -> Result<()> {
        match self {
            Rendezvous::File(path) => publish_file(path, id),
            Rendezvous::Tcp(addr) => publish_tcp(addr, id, peers, timeout),
        }
    }

    /// Nodes 1…: waits for node 0's id.
    pub fn receive(&self, len: usize, timeout: Duration) -> Result<Vec<u8>> {
        match self {
            Rendezvous::File(path) => receive_file(path, len, timeout),
            Rendezvous::Tcp(addr) => receive_tcp(addr, len, timeout),
        }
    }

    /// Node 0, when training ends: removes what the rendezvous left behind.
    pub fn clean_up(&self) {
        if let Rendezvous::File(path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn publish_file(path: &Path, id: &[u8]) -> Result<()> {
    if path.exists() {
        return Err(Error::Invalid(format!(
            "rendezvous file {} already exists (left by an earlier run?): remove it and start every node again",
            path.display()
        )));
    }
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, id).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

fn receive_file(path: &Path, len: usize, timeout: Duration) -> Result<Vec<u8>> {
    let start = Instant::now();
    loop {
        if let Ok(bytes) = std::fs::read(path) {
            if bytes.len() == len {
                return Ok(bytes);
            }
            return Err(Error::Invalid(format!(
                "rendezvous file {} holds {} bytes, expected {len}",
                path.display(),
                bytes.len()
            )));
        }
        if start.elapsed() > timeout {
            return Err(Error::Invalid(format!(
                "node 0 did not write the rendezvous file {} within {} s",
                path.display(),
                timeout.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn publish_tcp(addr: &str, id: &[u8], peers: usize, timeout: Duration) -> Result<()> {
    let listener = TcpListener::bind(addr)
        .map_err(|e| Error::Invalid(format!("rendezvous: cannot listen on {addr}: {e}")))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::Invalid(format!("rendezvous: {e}")))?;
    let start = Instant::now();
    let mut served = 0;
    while served < peers {
        match listener.accept() {
            Ok((mut stream, _)) => {
                stream
                    .set_nonblocking(false)
                    .and_then(|_| stream.write_all(MAGIC))
                    .and_then(|_| stream.write_all(id))
                    .and_then(|_| stream.flush())
                    .map_err(|e| Error::Invalid(format!("rendezvous on {addr}: {e}")))?;
                served += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if start.elapsed() > timeout {
                    return Err(Error::Invalid(format!(
                        "rendezvous on {addr}: {served} of {peers} nodes joined within {} s",
                        timeout.as_secs()
                    )));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(Error::Invalid(format!("rendezvous on {addr}: {e}"))),
        }
    }
    Ok(())
}

fn receive_tcp(addr: &str, len: usize, timeout: Duration) -> Result<Vec<u8>> {
    let start = Instant::now();
    loop {
        let attempt = addr
            .to_socket_addrs()
            .map_err(|e| Error::Invalid(format!("rendezvous address {addr}: {e}")))?
            .find_map(|a| TcpStream::connect_timeout(&a, Duration::from_secs(5)).ok());
        if let Some(mut stream) = attempt {
            let mut buf = vec![0u8; MAGIC.len() + len];
            stream
                .set_read_timeout(Some(timeout))
                .and_then(|_| stream.read_exact(&mut buf))
                .map_err(|e| Error::Invalid(format!("rendezvous with {addr}: {e}")))?;
            if &buf[..MAGIC.len()] != MAGIC {
                return Err(Error::Invalid(format!(
                    "rendezvous: {addr} is not a kb-train node 0"
                )));
            }
            return Ok(buf[MAGIC.len()..].to_vec());
        }
        if start.elapsed() > timeout {
            return Err(Error::Invalid(format!(
                "rendezvous: node 0 was not reachable at {addr} within {} s",
                timeout.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_forms_and_rejects_others() {
        assert_eq!(
            Rendezvous::parse("file:/shared/id").unwrap(),
            Rendezvous::File("/shared/id".into())
        );
        assert_eq!(
            Rendezvous::parse("tcp:10.0.0.1:29500").unwrap(),
            Rendezvous::Tcp("10.0.0.1:29500".into())
        );
        assert!(Rendezvous::parse("tcp:host").is_err());
        assert!(Rendezvous::parse("tcp::80").is_err());
        assert!(Rendezvous::parse("file:").is_err());
        assert!(Rendezvous::parse("/shared/id").is_err());
    }

    #[test]
    fn tcp_hands_the_id_to_every_node() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let r = Rendezvous::parse(&format!("tcp:127.0.0.1:{port}")).unwrap();
        let id: Vec<u8> = (0..128).map(|i| i as u8).collect();
        let t = Duration::from_secs(20);
        let got = std::thread::scope(|s| {
            let peers: Vec<_> = (0..3).map(|_| s.spawn(|| r.receive(128, t))).collect();
            r.publish(&id, 3, t).unwrap();
            peers
                .into_iter()
                .map(|p| p.join().unwrap().unwrap())
                .collect::<Vec<_>>()
        });
        assert!(got.iter().all(|g| g == &id));
    }

    #[test]
    fn file_hands_the_id_over_and_refuses_a_stale_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.nccl-id");
        let r = Rendezvous::File(path.clone());
        let id = vec![7u8; 128];
        let t = Duration::from_secs(20);
        let got = std::thread::scope(|s| {
            let peer = s.spawn(|| r.receive(128, t));
            std::thread::sleep(Duration::from_millis(300));
            r.publish(&id, 1, t).unwrap();
            peer.join().unwrap().unwrap()
        });
        assert_eq!(got, id);
        let err = r.publish(&id, 1, t).unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
        r.clean_up();
        assert!(!path.exists());
    }
}
