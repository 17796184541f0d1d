//! The UDP datapath groups datagrams of one flow that arrive together into one GSO send: over real
//! loopback sockets, a burst reaches the backend (and its echoes the client) as exactly the datagrams
//! sent — same count, bytes and order — whatever their sizes (equal runs, a shorter last one, larger
//! ones, empty ones, ones too large to group); and a backend that asked for `UDP_GRO` sees the grouped
//! sends whole, which shows the grouping happens.
//!
//! Every wait is bounded by a socket timeout; nothing sleeps to synchronise.

mod support;

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use lb_datapath::RelayMode;
use support::*;
use testkit::backends::{fill_pattern, udp_echo_server};

/// Receive buffer of the test's own sockets: a whole burst fits, so loopback never drops one.
const TEST_RCVBUF: usize = 4 << 20;

/// Sizes of one burst: runs of equal sizes (grouped), a shorter datagram closing a run, a larger one
/// after a shorter one, empty ones, sizes around the reply direction's grouping limit (1232), and
/// jumbo ones. About 40 KB, well within the VIP socket's default receive buffer.
const BURST: &[usize] = &[
    64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 30, 64, 64, 0, 200, 200, 200, 200, 200, 1, 1500, 1500,
    1500, 1500, 1232, 1232, 1232, 1233, 1233, 0, 0, 9000, 9000, 8999, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64,
    64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 7,
];

/// The datagrams of burst `round`: each with its own pattern, so a swap, a merge or a split shows.
fn burst(round: u64) -> Vec<Vec<u8>> {
    BURST
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            let mut datagram = vec![0u8; len];
            fill_pattern(round * 1000 + i as u64, 0, &mut datagram);
            datagram
        })
        .collect()
}

fn bound_socket(addr: &str) -> UdpSocket {
    let socket = UdpSocket::bind(addr).expect("bind a test socket");
    socket2::SockRef::from(&socket).set_recv_buffer_size(TEST_RCVBUF).expect("receive buffer");
    socket.set_read_timeout(Some(UDP_REPLY_TIMEOUT)).expect("read timeout");
    socket
}

/// A backend that records every datagram in arrival order.
fn recording_backend() -> (SocketAddr, mpsc::Receiver<Vec<u8>>, std::thread::JoinHandle<()>) {
    let socket = bound_socket("127.0.0.1:0");
    let addr = socket.local_addr().expect("bound");
    let (tx, rx) = mpsc::channel();
    let thread = std::thread::spawn(move || {
        let mut buffer = vec![0u8; 65_536];
        // Ends at the first datagram after the test dropped its receiver, or after a quiet timeout.
        while let Ok(n) = socket.recv(&mut buffer) {
            if tx.send(buffer[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    (addr, rx, thread)
}

fn receive(rx: &mpsc::Receiver<Vec<u8>>, what: &str) -> Vec<u8> {
    rx.recv_timeout(UDP_REPLY_TIMEOUT).unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

#[test]
fn a_burst_of_one_flow_reaches_the_backend_as_the_same_datagrams_in_order() {
    let (backend, received, recorder) = recording_backend();
    let key = udp_key(110);
    let engine =
        start_engine(1, RelayMode::Copy, snapshot(1, vec![entry(key, &[(backend, true)], test_policy())]));
    let client = bound_socket("127.0.0.1:0");
    for round in 0..20 {
        let sent = burst(round);
        for datagram in &sent {
            client.send_to(datagram, key.socket_addr()).expect("send to the VIP");
        }
        for (i, expected) in sent.iter().enumerate() {
            let got = receive(&received, &format!("datagram {i} of burst {round}"));
            assert_eq!(got.len(), expected.len(), "datagram {i} of burst {round}: size");
            assert!(
                got == *expected,
                "datagram {i} of burst {round} ({} bytes) altered or out of order",
                got.len()
            );
        }
    }
    wait_until("the worker counted every datagram", Duration::from_secs(5), || {
        engine.stats().total().udp_datagrams_client_to_backend == 20 * BURST.len() as u64
    });
    let total = engine.stats().total();
    assert_eq!(total.udp_bytes_client_to_backend, 20 * BURST.iter().sum::<usize>() as u64);
    assert_eq!(total.udp_drops_send + total.udp_drops_truncated, 0, "{total:?}");
    assert_eq!(total.flows_created, 1);
    drop(received);
    // Wakes the recorder, which then finds its receiver gone and ends.
    client.send_to(b"stop", backend).expect("wake the recorder");
    recorder.join().expect("the recording backend ends");
}

#[test]
fn a_burst_of_echoes_comes_back_to_the_client_as_the_same_datagrams_in_order() {
    let echo = udp_echo_server().expect("echo");
    let key = udp_key(111);
    let entries = vec![entry(key, &[(echo.addr(), true)], test_policy())];
    echoes_come_back_in_order(test_config(1, RelayMode::Copy), entries, key);
}

/// As above through a wildcard VIP socket: the grouped replies name the VIP as source address in a
/// control message beside their segment size, and the client, `connect`ed to the VIP, gets them all.
#[test]
fn a_burst_of_echoes_through_a_wildcard_comes_back_from_the_vip_in_order() {
    let echo = udp_echo_server().expect("echo");
    let port = free_udp_port_everywhere();
    let keys = [112, 113].map(|octet| lb_core::VipKey::new(vip(octet), port, lb_core::Protocol::Udp));
    let entries = keys.iter().map(|key| entry(*key, &[(echo.addr(), true)], test_policy())).collect();
    let config = lb_datapath::EngineConfig {
        listen_mode: lb_datapath::ListenMode::Wildcard,
        ..test_config(1, RelayMode::Copy)
    };
    echoes_come_back_in_order(config, entries, keys[1]);
}

/// Sends 20 bursts to `key` and checks each echo, in order, from `key` (the client is `connect`ed
/// to it, so a reply from any other source would never arrive).
fn echoes_come_back_in_order(
    config: lb_datapath::EngineConfig,
    entries: Vec<lb_core::ServiceEntry>,
    key: lb_core::VipKey,
) {
    let engine = start_engine_with(config, snapshot(1, entries));
    let client = bound_socket("127.0.0.1:0");
    client.connect(key.socket_addr()).expect("connect to the VIP");
    let mut buffer = vec![0u8; 65_536];
    for round in 0..20 {
        let sent = burst(round);
        for datagram in &sent {
            client.send(datagram).expect("send to the VIP");
        }
        for (i, expected) in sent.iter().enumerate() {
            let n = client.recv(&mut buffer).unwrap_or_else(|e| panic!("echo {i} of burst {round}: {e}"));
            assert_eq!(n, expected.len(), "echo {i} of burst {round}: size");
            assert!(
                buffer[..n] == expected[..],
                "echo {i} of burst {round} ({n} bytes) altered or out of order"
            );
        }
    }
    wait_until("the worker counted every echo", Duration::from_secs(5), || {
        engine.stats().total().udp_datagrams_backend_to_client == 20 * BURST.len() as u64
    });
    let total = engine.stats().total();
    assert_eq!(total.udp_drops_send + total.udp_drops_truncated, 0, "{total:?}");
    assert!(
        total.udp_sends < total.udp_datagrams_client_to_backend * 2,
        "some sends were grouped: {total:?}"
    );
}

/// A backend socket with `UDP_GRO` on: the kernel hands it a GSO send whole, with its segment size.
fn gro_backend() -> UdpSocket {
    let socket = bound_socket("127.0.0.1:0");
    let on: libc::c_int = 1;
    // SAFETY: passes a valid c_int option value and its size for an open socket.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_GRO,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "UDP_GRO: {}", std::io::Error::last_os_error());
    socket
}

/// One receive of a `UDP_GRO` socket: the payload and, if it is several datagrams grouped, their size.
fn receive_gro(socket: &UdpSocket, buffer: &mut [u8]) -> (usize, Option<usize>) {
    let mut control = [0u64; 8];
    let mut iov = libc::iovec { iov_base: buffer.as_mut_ptr().cast(), iov_len: buffer.len() };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = &mut iov;
    message.msg_iovlen = 1;
    message.msg_control = control.as_mut_ptr().cast();
    message.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: the header points to `buffer` and `control`, both valid for writes of the lengths given
    // and alive for the call.
    let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut message, 0) };
    assert!(n >= 0, "a grouped send arrives: {}", std::io::Error::last_os_error());
    let control: Vec<u8> = control.iter().flat_map(|word| word.to_ne_bytes()).collect();
    let control = &control[..message.msg_controllen.min(control.len())];
    // One cmsghdr at most: len (usize), level (i32), type (i32), then the u16 segment size.
    let header = std::mem::size_of::<usize>() + 8;
    let field = |at: usize| i32::from_ne_bytes(control[at..at + 4].try_into().expect("4 bytes"));
    let segment = (control.len() >= header + 2 && field(8) == libc::SOL_UDP && field(12) == libc::UDP_GRO)
        .then(|| usize::from(u16::from_ne_bytes([control[header], control[header + 1]])));
    (n as usize, segment)
}

#[test]
fn a_backend_that_accepts_grouped_datagrams_sees_a_burst_grouped_with_its_boundaries() {
    let backend = gro_backend();
    let key = udp_key(112);
    let engine = start_engine(
        1,
        RelayMode::Copy,
        snapshot(1, vec![entry(key, &[(backend.local_addr().expect("bound"), true)], test_policy())]),
    );
    let client = bound_socket("127.0.0.1:0");
    let mut buffer = vec![0u8; 65_536];
    let mut grouped = 0;
    // Whether datagrams arrive in one completion batch depends on scheduling; bursts of 32 equal ones
    // make it near certain for at least one of them, and the bound keeps a broken grouping from hanging.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut round = 0u64;
    while grouped == 0 {
        assert!(Instant::now() < deadline, "no burst of {round} reached the backend grouped");
        let sent: Vec<Vec<u8>> = (0..32)
            .map(|i| {
                let mut datagram = vec![0u8; if i == 31 { 50 } else { 100 }];
                fill_pattern(round * 100 + i, 0, &mut datagram);
                datagram
            })
            .collect();
        for datagram in &sent {
            client.send_to(datagram, key.socket_addr()).expect("send to the VIP");
        }
        let mut arrived = Vec::new();
        while arrived.len() < sent.len() {
            let (n, segment) = receive_gro(&backend, &mut buffer);
            match segment {
                Some(size) => {
                    grouped += 1;
                    arrived.extend(buffer[..n].chunks(size).map(<[u8]>::to_vec));
                }
                None => arrived.push(buffer[..n].to_vec()),
            }
        }
        assert!(arrived == sent, "burst {round} arrived with other boundaries, bytes or order");
        round += 1;
    }
    // A worker counts a send when it completes, which may be just after the backend read it.
    wait_until("the worker counted every datagram", Duration::from_secs(5), || {
        engine.stats().total().udp_datagrams_client_to_backend == 32 * round
    });
    let total = engine.stats().total();
    assert!(
        total.udp_sends < total.udp_datagrams_client_to_backend,
        "a grouped send counts once for its datagrams: {} sends for {} datagrams",
        total.udp_sends,
        total.udp_datagrams_client_to_backend
    );
}
