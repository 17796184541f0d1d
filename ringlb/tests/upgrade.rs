//! Hot upgrade end to end: while clients connect continuously through a VIP, a second `ringlb
//! run` started with the same `--upgrade-socket` takes the VIP sockets of the running one over;
//! no connection is refused or reset, a connection opened before the upgrade goes on byte-exact
//! on the old process while it drains, the new process takes over the admin port, and the old
//! process exits once its last connection closed. Every wait polls a real condition under a
//! deadline.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use support::{IO_TIMEOUT, Ringlb, http_get, loopback, poll_until, port_free_on, save, web_manifest};
use testkit::backends::Server;

fn echo_on(addr: SocketAddr) -> Server {
    Server::spawn_on(addr, |mut stream: TcpStream| {
        let mut reader = stream.try_clone().expect("clone");
        let _ = std::io::copy(&mut reader, &mut stream);
    })
    .expect("bind an echo backend")
}

/// One request through `vip`: connect, send, read the echo, close.
fn exchange(vip: SocketAddr, payload: &[u8]) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&vip, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.write_all(payload)?;
    let mut echo = vec![0u8; payload.len()];
    stream.read_exact(&mut echo)?;
    if echo != payload {
        return Err(std::io::Error::other("a wrong echo"));
    }
    Ok(())
}

fn pid_at(admin: SocketAddr) -> Option<u64> {
    let (code, body) = http_get(admin, "/status").ok()?;
    let status: serde_json::Value = serde_json::from_str(&body).ok().filter(|_| code == 200)?;
    status["pid"].as_u64()
}

#[test]
fn a_new_ringlb_takes_the_vip_sockets_over_under_load_and_the_old_one_drains_and_exits() {
    let ip = loopback(141);
    let port = port_free_on(&[ip]);
    let _backend = echo_on(SocketAddr::new(ip, port));
    let vip = SocketAddr::new(loopback(140), port_free_on(&[loopback(140)]));
    let dir = tempfile::tempdir().expect("temp dir");
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).expect("manifest dir");
    save(&manifests.join("web.yaml"), &web_manifest(vip, port, &[(ip, true)]));
    let socket = dir.path().join("upgrade.sock");
    let args = [
        "run",
        "--manifests",
        manifests.to_str().expect("utf-8"),
        "--upgrade-socket",
        socket.to_str().expect("utf-8"),
        "--shutdown-grace",
        "30s",
    ];
    let mut old = Ringlb::start(&args);
    old.wait_ready();
    let admin = old.admin;
    assert_eq!(pid_at(admin), Some(u64::from(old.pid())));

    // A long-lived connection through the old process, and clients connecting all along.
    let mut long_lived = TcpStream::connect(vip).expect("connect");
    long_lived.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    let stop = Arc::new(AtomicBool::new(false));
    let (served, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let clients: Vec<_> = (0..3)
        .map(|client| {
            let (stop, served, failed) = (Arc::clone(&stop), Arc::clone(&served), Arc::clone(&failed));
            std::thread::spawn(move || {
                let mut errors = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match exchange(vip, format!("client {client}").as_bytes()) {
                        Ok(()) => served.fetch_add(1, Ordering::Relaxed),
                        Err(error) => {
                            errors.push(error.to_string());
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
                errors
            })
        })
        .collect();
    poll_until("clients served before the upgrade", || (served.load(Ordering::Relaxed) > 50).then_some(()));

    // The upgrade: the same command with the same admin address.
    let mut command = Command::new(env!("CARGO_BIN_EXE_ringlb"));
    command.args(args).args(["--admin", &admin.to_string(), "--workers", "2", "--log-level", "warn"]);
    let mut new = Ringlb::spawn(command, admin);
    let new_pid = u64::from(new.pid());
    poll_until("the new ringlb to answer on the admin port", || {
        (pid_at(admin) == Some(new_pid)).then_some(())
    });
    new.wait_ready();
    let before = served.load(Ordering::Relaxed);
    poll_until("clients served by the new ringlb", || {
        (served.load(Ordering::Relaxed) > before + 50).then_some(())
    });

    // The old process drains: the connection it holds goes on, byte-exact, both ways.
    assert!(old.is_running(), "the old ringlb drains its connection");
    for round in 0..3u8 {
        let message = [round; 1000];
        long_lived.write_all(&message).expect("write on the long-lived connection");
        let mut echo = [0u8; 1000];
        long_lived.read_exact(&mut echo).expect("its echo");
        assert_eq!(echo, message);
    }
    stop.store(true, Ordering::Relaxed);
    let errors: Vec<String> = clients.into_iter().flat_map(|c| c.join().expect("client thread")).collect();
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no client refused or reset across the upgrade: {errors:?}"
    );

    // Its last connection closed, the old process exits by itself, and the new one serves on.
    drop(long_lived);
    let status = old.wait();
    assert!(status.success(), "the old ringlb exits cleanly: {status}");
    exchange(vip, b"after").expect("the new ringlb serves alone");
    assert!(socket.exists(), "the new ringlb offers the next upgrade");
    assert!(new.is_running());
}
