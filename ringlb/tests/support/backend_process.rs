//! A backend that is a process of its own (python3), so that a test can `kill -9` it and the
//! kernel, not the test, closes its sockets, as when a pod's process dies.
//!
//! Protocol: a client's first byte picks the mode. `p` (ping): the backend answers its name and a
//! newline, then closes (a FIN). `s` (stream): the backend answers its name and a newline, then
//! writes 1 KiB every 5 ms until the connection ends, and never reads again: any byte the client
//! sends after the `s` stays unread in the backend's socket, so a kill closes that socket with a
//! reset instead of a FIN (RFC 2525, 2.17, as Linux does).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

const SCRIPT: &str = r#"
import socket, sys, threading, time
host, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode() + b"\n"
listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((host, port))
listener.listen(1024)
print("listening", flush=True)

def serve(connection):
    try:
        mode = connection.recv(1)
        connection.sendall(name)
        if mode == b"s":
            chunk = b"." * 1024
            while True:
                connection.sendall(chunk)
                time.sleep(0.005)
    except OSError:
        pass
    finally:
        connection.close()

while True:
    connection, _ = listener.accept()
    threading.Thread(target=serve, args=(connection,), daemon=True).start()
"#;

/// A backend process; killed (and reaped) on drop.
pub struct BackendProcess {
    child: Option<Child>,
    pub addr: SocketAddr,
}

impl BackendProcess {
    /// Starts the backend on `addr` greeting with `name`; returns once it listens.
    pub fn start(addr: SocketAddr, name: &str) -> BackendProcess {
        let mut child = Command::new("python3")
            .args(["-c", SCRIPT, &addr.ip().to_string(), &addr.port().to_string(), name])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 is installed");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("piped stdout");
        // The script prints once it listens, or exits (closing stdout) if it cannot bind.
        BufReader::new(stdout).read_line(&mut line).expect("read the backend's stdout");
        assert_eq!(line.trim(), "listening", "the backend process on {addr} did not start");
        BackendProcess { child: Some(child), addr }
    }

    /// `kill -9`, then reaps the process: when this returns its sockets are closed.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL the backend");
        child.wait().expect("reap the backend");
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
