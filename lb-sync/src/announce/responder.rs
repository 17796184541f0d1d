//! Answering for the VIPs this replica holds where the kernel would not: ARP requests when the
//! interface ignores requests for addresses of other links (`arp_ignore` 1 or more, which
//! kube-proxy's IPVS mode sets), and IPv6 neighbour solicitations always (Linux answers a
//! solicitation only for an address of the interface it came in on, never for one on the VIP
//! link).
//!
//! - ARP: a packet socket on the interface sees every ARP frame; a request for a held VIP (not
//!   an announcement: sender and target addresses differ) gets a unicast reply from the VIP at
//!   this interface's MAC. With `arp_ignore=0` the kernel answers too, with the same MAC.
//! - NDP: a raw ICMPv6 socket on the interface, filtered to solicitations, and membership of each
//!   held VIP's solicited-node group (so the interface takes those multicast frames); a
//!   solicitation for a held VIP gets a solicited advertisement (Solicited and Override, the
//!   target link-layer address) to its source, or to all nodes when the source is unspecified
//!   (duplicate address detection). Solicitations whose hop limit is not 255 came from off-link
//!   and are ignored (RFC 4861 7.1.1).
//!
//! Invariants: only addresses in the held set are answered, and only while held; group
//! memberships follow the held set; a receive or send error is counted and logged at most every
//! 30 s, and never ends the task.

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lb_core::LogThrottle;
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

use super::{Announcer, ETH_P_ARP, ETH_P_IP, advertisement, send_to};

const ARP_REPLY: u16 = 2;
const ICMPV6_NEIGHBOUR_SOLICITATION: u8 = 135;
/// `ICMPV6_FILTER` of `<linux/icmpv6.h>` (libc has no binding).
const ICMPV6_FILTER: libc::c_int = 1;
const LOG_EVERY: Duration = Duration::from_secs(30);

/// What the responder did.
#[derive(Debug, Default)]
pub struct ResponderCounters {
    pub arp_replies: AtomicU64,
    pub neighbour_advertisements: AtomicU64,
    pub errors: AtomicU64,
}

/// Answers ARP requests and neighbour solicitations for held VIPs on one interface.
pub struct Responder {
    announcer: Arc<Announcer>,
    arp: AsyncFd<OwnedFd>,
    solicitations: AsyncFd<OwnedFd>,
    counters: Arc<ResponderCounters>,
}

impl Responder {
    /// Sockets on the announcer's interface (needs `CAP_NET_RAW`).
    pub fn new(announcer: Arc<Announcer>) -> io::Result<Responder> {
        let arp = register(arp_socket(announcer.index)?)?;
        let solicitations = register(solicitation_socket(announcer.index)?)?;
        Ok(Responder { announcer, arp, solicitations, counters: Arc::default() })
    }

    pub fn counters(&self) -> Arc<ResponderCounters> {
        Arc::clone(&self.counters)
    }

    /// Answers for `held` as it changes, until `stop` resolves or `held`'s sender is gone (the
    /// VIP link closed).
    pub async fn run(self, mut held: watch::Receiver<BTreeSet<IpAddr>>, stop: impl Future) {
        let mut stop = std::pin::pin!(stop);
        let mut joined: BTreeSet<Ipv6Addr> = BTreeSet::new();
        let mut log = LogThrottle::new(LOG_EVERY);
        let mut buffer = [0u8; 1500];
        loop {
            let current = held.borrow_and_update().clone();
            self.follow_groups(&current, &mut joined, &mut log);
            tokio::select! {
                _ = &mut stop => break,
                changed = held.changed() => if changed.is_err() { break },
                ready = self.arp.readable() => {
                    let Ok(mut guard) = ready else { continue };
                    match guard.try_io(|fd| receive(fd.get_ref(), &mut buffer)) {
                        Ok(Ok((len, from))) => self.on_arp(&buffer[..len], &from, &current, &mut log),
                        Ok(Err(error)) => self.failed("receive ARP", &error, &mut log),
                        Err(_would_block) => {}
                    }
                }
                ready = self.solicitations.readable() => {
                    let Ok(mut guard) = ready else { continue };
                    match guard.try_io(|fd| receive_icmpv6(fd.get_ref(), &mut buffer)) {
                        Ok(Ok((len, from, hops))) => {
                            self.on_solicitation(&buffer[..len], from, hops, &current, &mut log)
                        }
                        Ok(Err(error)) => self.failed("receive a neighbour solicitation", &error, &mut log),
                        Err(_would_block) => {}
                    }
                }
            }
        }
        self.follow_groups(&BTreeSet::new(), &mut joined, &mut log);
    }

    fn failed(&self, what: &str, error: &io::Error, log: &mut LogThrottle) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = log.admit(Instant::now()) {
            tracing::warn!(interface = self.announcer.interface(), %error, suppressed, "cannot {what}");
        }
    }

    /// Joins the solicited-node groups of the held IPv6 VIPs and leaves the others.
    fn follow_groups(&self, held: &BTreeSet<IpAddr>, joined: &mut BTreeSet<Ipv6Addr>, log: &mut LogThrottle) {
        let wanted: BTreeSet<Ipv6Addr> = held
            .iter()
            .filter_map(|ip| match ip {
                IpAddr::V6(v6) => Some(solicited_node(*v6)),
                IpAddr::V4(_) => None,
            })
            .collect();
        for group in joined.difference(&wanted).copied().collect::<Vec<_>>() {
            if let Err(error) = membership(&self.solicitations, group, self.announcer.index, false) {
                self.failed("leave a solicited-node group", &error, log);
            }
            joined.remove(&group);
        }
        for group in wanted.difference(joined).copied().collect::<Vec<_>>() {
            match membership(&self.solicitations, group, self.announcer.index, true) {
                Ok(()) => {
                    joined.insert(group);
                }
                Err(error) => self.failed("join a solicited-node group", &error, log),
            }
        }
    }

    fn on_arp(&self, frame: &[u8], from: &libc::sockaddr_ll, held: &BTreeSet<IpAddr>, log: &mut LogThrottle) {
        let Some(request) = ArpRequest::parse(frame) else { return };
        if request.sender_ip == request.target_ip || !held.contains(&IpAddr::V4(request.target_ip)) {
            return;
        }
        let reply = reply(self.announcer.mac, &request);
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid start.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_protocol = ETH_P_ARP.to_be();
        to.sll_ifindex = self.announcer.index;
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&from.sll_addr[..6]);
        match send_to(self.arp.get_ref(), &reply, &to) {
            Ok(()) => {
                self.counters.arp_replies.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => self.failed("send an ARP reply", &error, log),
        }
    }

    fn on_solicitation(
        &self,
        message: &[u8],
        from: Ipv6Addr,
        hops: Option<u8>,
        held: &BTreeSet<IpAddr>,
        log: &mut LogThrottle,
    ) {
        if hops.is_some_and(|hops| hops != 255)
            || message.len() < 24
            || message[0] != ICMPV6_NEIGHBOUR_SOLICITATION
        {
            return;
        }
        let mut target = [0u8; 16];
        target.copy_from_slice(&message[8..24]);
        let target = Ipv6Addr::from(target);
        if !held.contains(&IpAddr::V6(target)) {
            return;
        }
        // Duplicate address detection asks from `::`: the answer goes to everyone, unsolicited.
        let (to, solicited) = if from.is_unspecified() { (super::ALL_NODES, false) } else { (from, true) };
        let advertisement = advertisement(self.announcer.mac, target, solicited);
        // SAFETY: sockaddr_in6 is plain data; all-zero is a valid start.
        let mut address: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        address.sin6_family = libc::AF_INET6 as u16;
        address.sin6_addr.s6_addr = to.octets();
        address.sin6_scope_id = self.announcer.index as u32;
        match send_to(&self.announcer.icmpv6, &advertisement, &address) {
            Ok(()) => {
                self.counters.neighbour_advertisements.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => self.failed("send a neighbour advertisement", &error, log),
        }
    }
}

/// `socket` in the runtime's reactor.
fn register(socket: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd keeps its descriptor open, and the same one, until it is dropped, which
    // happens only with the AsyncFd.
    Ok(unsafe { AsyncFd::register(socket) }?)
}

/// The fields of an Ethernet/IPv4 ARP request that a reply needs.
#[derive(Debug, PartialEq, Eq)]
pub struct ArpRequest {
    pub sender_mac: [u8; 6],
    pub sender_ip: Ipv4Addr,
    pub target_ip: Ipv4Addr,
}

impl ArpRequest {
    /// An ARP payload (no Ethernet header), if it is an Ethernet/IPv4 request.
    pub fn parse(frame: &[u8]) -> Option<ArpRequest> {
        let header = frame.get(..8)?;
        if header != [0, 1, (ETH_P_IP >> 8) as u8, ETH_P_IP as u8, 6, 4, 0, 1] || frame.len() < 28 {
            return None;
        }
        let mut sender_mac = [0u8; 6];
        sender_mac.copy_from_slice(&frame[8..14]);
        let ip = |at: usize| Ipv4Addr::new(frame[at], frame[at + 1], frame[at + 2], frame[at + 3]);
        Some(ArpRequest { sender_mac, sender_ip: ip(14), target_ip: ip(24) })
    }
}

/// The ARP reply to `request` from its target at `mac`.
pub fn reply(mac: [u8; 6], request: &ArpRequest) -> [u8; 28] {
    let mut frame = [0u8; 28];
    frame[0..2].copy_from_slice(&1u16.to_be_bytes());
    frame[2..4].copy_from_slice(&ETH_P_IP.to_be_bytes());
    frame[4] = 6;
    frame[5] = 4;
    frame[6..8].copy_from_slice(&ARP_REPLY.to_be_bytes());
    frame[8..14].copy_from_slice(&mac);
    frame[14..18].copy_from_slice(&request.target_ip.octets());
    frame[18..24].copy_from_slice(&request.sender_mac);
    frame[24..28].copy_from_slice(&request.sender_ip.octets());
    frame
}

/// The solicited-node multicast group of `address` (`ff02::1:ffXX:XXXX`, RFC 4291 2.7.1).
pub fn solicited_node(address: Ipv6Addr) -> Ipv6Addr {
    let o = address.octets();
    Ipv6Addr::from([0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, o[13], o[14], o[15]])
}

/// A non-blocking packet socket receiving the ARP frames of interface `index`.
fn arp_socket(index: i32) -> io::Result<OwnedFd> {
    let socket = super::packet_socket(libc::SOCK_NONBLOCK)?;
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid start.
    let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    address.sll_family = libc::AF_PACKET as u16;
    address.sll_protocol = ETH_P_ARP.to_be();
    address.sll_ifindex = index;
    // SAFETY: bind(2) with a sockaddr_ll that outlives the call and its size.
    let bound = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            std::ptr::from_ref(&address).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if bound < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}

/// A non-blocking raw ICMPv6 socket on interface `index` that takes only neighbour solicitations
/// and reports each one's hop limit.
fn solicitation_socket(index: i32) -> io::Result<OwnedFd> {
    let socket = super::raw_icmpv6(libc::SOCK_NONBLOCK)?;
    // ICMP6_FILTER: a bit set blocks a type; all blocked but solicitations.
    let mut filter = [u32::MAX; 8];
    let kind = usize::from(ICMPV6_NEIGHBOUR_SOLICITATION);
    filter[kind >> 5] &= !(1 << (kind & 31));
    super::set_option(&socket, libc::IPPROTO_ICMPV6, ICMPV6_FILTER, &filter)?;
    super::set_option(&socket, libc::IPPROTO_IPV6, libc::IPV6_RECVHOPLIMIT, &(1 as libc::c_int))?;
    super::set_option(&socket, libc::SOL_SOCKET, libc::SO_BINDTOIFINDEX, &(index as libc::c_int))?;
    Ok(socket)
}

/// Joins (or leaves) `group` on interface `index`.
fn membership(socket: &AsyncFd<OwnedFd>, group: Ipv6Addr, index: i32, join: bool) -> io::Result<()> {
    let request = libc::ipv6_mreq {
        ipv6mr_multiaddr: libc::in6_addr { s6_addr: group.octets() },
        ipv6mr_interface: index as u32,
    };
    let option = if join { libc::IPV6_ADD_MEMBERSHIP } else { libc::IPV6_DROP_MEMBERSHIP };
    super::set_option(socket.get_ref(), libc::IPPROTO_IPV6, option, &request)
}

/// One frame from a packet socket and where it came from.
fn receive(socket: &OwnedFd, buffer: &mut [u8]) -> io::Result<(usize, libc::sockaddr_ll)> {
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid start.
    let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // SAFETY: the buffer and the address outlive the call, with their lengths.
    let received = unsafe {
        libc::recvfrom(
            socket.as_raw_fd(),
            buffer.as_mut_ptr().cast(),
            buffer.len(),
            0,
            std::ptr::from_mut(&mut from).cast(),
            &mut len,
        )
    };
    if received < 0 { Err(io::Error::last_os_error()) } else { Ok((received as usize, from)) }
}

/// One ICMPv6 message, its source and its hop limit (when the kernel told it).
fn receive_icmpv6(socket: &OwnedFd, buffer: &mut [u8]) -> io::Result<(usize, Ipv6Addr, Option<u8>)> {
    // SAFETY: plain data; all-zero is a valid start.
    let mut from: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    let mut control = [0u64; 8];
    let mut vector = libc::iovec { iov_base: buffer.as_mut_ptr().cast(), iov_len: buffer.len() };
    // SAFETY: plain data; all-zero is a valid start.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_name = std::ptr::from_mut(&mut from).cast();
    header.msg_namelen = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    header.msg_iov = &mut vector;
    header.msg_iovlen = 1;
    header.msg_control = control.as_mut_ptr().cast();
    header.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: every pointer in `header` points at a live local with the length given.
    let received = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut header, 0) };
    if received < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut hops = None;
    // SAFETY: the CMSG macros walk the control buffer the kernel filled, within msg_controllen.
    unsafe {
        let mut message = libc::CMSG_FIRSTHDR(&header);
        while !message.is_null() {
            if (*message).cmsg_level == libc::IPPROTO_IPV6 && (*message).cmsg_type == libc::IPV6_HOPLIMIT {
                let value = std::ptr::read_unaligned(libc::CMSG_DATA(message).cast::<libc::c_int>());
                hops = u8::try_from(value).ok();
            }
            message = libc::CMSG_NXTHDR(&header, message);
        }
    }
    Ok((received as usize, Ipv6Addr::from(from.sin6_addr.s6_addr), hops))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_answered_from_its_target_to_its_sender() {
        let asker = [0x02, 0, 0, 0, 0, 0x01];
        let request = ArpRequest {
            sender_mac: asker,
            sender_ip: Ipv4Addr::new(192, 0, 2, 1),
            target_ip: Ipv4Addr::new(192, 0, 2, 7),
        };
        let mut frame = super::super::announcement(asker, Ipv4Addr::new(192, 0, 2, 1)).to_vec();
        frame[24..28].copy_from_slice(&[192, 0, 2, 7]);
        assert_eq!(ArpRequest::parse(&frame), Some(request));
        let ours = [0x02, 0, 0, 0, 0, 0x42];
        let answer = reply(ours, ArpRequest::parse(&frame).as_ref().expect("a request"));
        assert_eq!(&answer[..8], &[0, 1, 8, 0, 6, 4, 0, 2], "Ethernet/IPv4 reply");
        assert_eq!((&answer[8..14], &answer[14..18]), (&ours[..], &[192, 0, 2, 7][..]));
        assert_eq!((&answer[18..24], &answer[24..28]), (&asker[..], &[192, 0, 2, 1][..]));
        assert_eq!(ArpRequest::parse(&answer), None, "a reply is no request");
    }

    #[test]
    fn solicited_node_groups_keep_the_last_24_bits() {
        let address: Ipv6Addr = "2001:db8::12:3456:789a".parse().expect("literal");
        assert_eq!(solicited_node(address), "ff02::1:ff56:789a".parse::<Ipv6Addr>().expect("literal"));
    }
}
