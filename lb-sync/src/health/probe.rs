//! One active probe against one backend: a TCP connect, or a minimal HTTP/1.1 `GET` over a fresh
//! connection (`Connection: close`) whose status code must equal the expected one.
//!
//! A probe never outlives its deadline (the caller bounds it with a timeout) and never touches a
//! datapath connection: it opens its own socket from the control thread and closes it when done.
//! A backend that expects a PROXY protocol header gets the LOCAL one first (see
//! `lb_core::ProxyHeader::local`), so a backend that refuses connections without one is still checked.
//! Only the status line is read; bodies and headers are ignored, so a probe reads at most a few KiB.
//! A probe that fails for the load balancer's own lack of resources (no descriptor, no source port,
//! no memory) is [`ProbeFailure::Local`]: it says nothing about the backend.

use std::fmt;
use std::net::SocketAddr;

use lb_core::health::ProbeKind;
use lb_core::{LocalResource, ProxyHeader, ProxyProtocol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The longest status line a probe reads before calling the answer malformed.
const MAX_STATUS_LINE: usize = 4096;

/// Why a probe did not pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ProbeFailure {
    /// The backend failed it (refused, reset, wrong status, malformed answer, too slow).
    Backend(String),
    /// The load balancer could not make it: not the backend's fault.
    Local(LocalResource, String),
}

impl ProbeFailure {
    /// An I/O error at `stage`: local when it is one of the load balancer's own shortages.
    fn io(stage: &str, error: std::io::Error) -> ProbeFailure {
        match LocalResource::of_io_error(&error) {
            Some(resource) => ProbeFailure::Local(resource, format!("{stage}: {error}")),
            None => ProbeFailure::Backend(format!("{stage}: {error}")),
        }
    }
}

impl fmt::Display for ProbeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeFailure::Backend(reason) => f.write_str(reason),
            ProbeFailure::Local(resource, reason) => write!(f, "no {} here: {reason}", resource.name()),
        }
    }
}

/// Runs `kind` against `addr`, after the LOCAL header of `proxy_protocol` if any; `Err` says why
/// the probe did not pass (for the log).
pub(crate) async fn probe(
    addr: SocketAddr,
    kind: &ProbeKind,
    proxy_protocol: ProxyProtocol,
) -> Result<(), ProbeFailure> {
    let mut stream = TcpStream::connect(addr).await.map_err(|error| ProbeFailure::io("connect", error))?;
    if let Some(header) = ProxyHeader::local(proxy_protocol) {
        stream
            .write_all(header.as_bytes())
            .await
            .map_err(|error| ProbeFailure::io("send PROXY header", error))?;
    }
    match kind {
        ProbeKind::Tcp => Ok(()),
        ProbeKind::Http { path, expected_status } => {
            let request = format!(
                "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: ringlb-health\r\nConnection: close\r\n\r\n"
            );
            stream
                .write_all(request.as_bytes())
                .await
                .map_err(|error| ProbeFailure::io("send request", error))?;
            let status = read_status(&mut stream).await?;
            if status == *expected_status {
                Ok(())
            } else {
                Err(ProbeFailure::Backend(format!("HTTP status {status}, expected {expected_status}")))
            }
        }
    }
}

/// Reads up to the end of the status line and returns its code.
async fn read_status(stream: &mut TcpStream) -> Result<u16, ProbeFailure> {
    let mut buffer = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        if let Some(end) = buffer.windows(2).position(|w| w == b"\r\n") {
            return parse_status_line(&buffer[..end]).map_err(ProbeFailure::Backend);
        }
        if buffer.len() > MAX_STATUS_LINE {
            return Err(ProbeFailure::Backend("status line too long".to_owned()));
        }
        let read = stream.read(&mut chunk).await.map_err(|error| ProbeFailure::io("read response", error))?;
        if read == 0 {
            return Err(ProbeFailure::Backend("connection closed before a status line".to_owned()));
        }
        buffer.extend_from_slice(&chunk[..read]);
    }
}

/// `HTTP/1.x NNN reason` → `NNN`.
fn parse_status_line(line: &[u8]) -> Result<u16, String> {
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let malformed = || format!("malformed status line {line:?}");
    match (parts.next(), parts.next()) {
        (Some(version), Some(code)) if version.starts_with("HTTP/1.") && code.len() == 3 => {
            code.parse().map_err(|_| malformed())
        }
        _ => Err(malformed()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_shortages_are_not_the_backends_failure() {
        let local =
            ProbeFailure::io("connect", std::io::Error::from_raw_os_error(lb_core::local::errno::EMFILE));
        assert!(matches!(local, ProbeFailure::Local(LocalResource::Descriptors, _)), "{local:?}");
        // ECONNREFUSED
        let refused = ProbeFailure::io("connect", std::io::Error::from_raw_os_error(111));
        assert!(matches!(refused, ProbeFailure::Backend(_)), "{refused:?}");
    }

    #[tokio::test]
    async fn a_probe_sends_the_local_header_before_its_request() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("bound");
        let backend = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let mut header = [0u8; 16];
            stream.read_exact(&mut header).await.expect("the header");
            stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await.expect("answer");
            header
        });
        let kind = ProbeKind::Http { path: "/".to_owned(), expected_status: 200 };
        probe(addr, &kind, ProxyProtocol::V2).await.expect("the probe passes");
        let header = backend.await.expect("backend");
        assert_eq!(&header[..12], b"\r\n\r\n\0\r\nQUIT\n");
        assert_eq!(&header[12..], &[0x20, 0x00, 0, 0], "v2 LOCAL, no addresses");
    }

    #[test]
    fn status_lines_parse_to_their_code_and_garbage_is_an_error() {
        assert_eq!(parse_status_line(b"HTTP/1.1 503 Service Unavailable"), Ok(503));
        assert_eq!(parse_status_line(b"HTTP/1.0 200"), Ok(200));
        assert!(parse_status_line(b"SSH-2.0-OpenSSH").is_err());
        assert!(parse_status_line(b"HTTP/1.1 2000 OK").is_err());
    }
}
