//! Telling the neighbours on an interface (`--announce-interface`) that a VIP now lives at this
//! host's MAC address, so that routers and clients that cached another owner switch at once
//! instead of when their entry expires (minutes on many switches).
//!
//! - IPv4: gratuitous ARP, an ARP request for the VIP from the VIP (RFC 5227's announcement:
//!   sender and target address equal, target hardware address zero), broadcast through a packet
//!   socket; Linux and common switches override an existing entry on it.
//! - IPv6: an unsolicited neighbour advertisement (RFC 4861 7.2.6) to all nodes (`ff02::1`) with
//!   the Override flag and the target link-layer address, hop limit 255 (receivers drop anything
//!   else); the kernel fills in the checksum and the interface's link-local source.
//!
//! Each is sent [`REPEATS`] times, [`SPACING`] apart, because a single frame can be lost. Who
//! asks later is answered by [`responder::Responder`] where the kernel would not: IPv6
//! solicitations for a VIP on the VIP link always, ARP requests under `arp_ignore` 1 or more.

use std::ffi::CString;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

pub mod responder;

/// How many times each announcement is sent.
pub const REPEATS: usize = 3;

/// The time between two sends of one announcement.
pub const SPACING: Duration = Duration::from_millis(500);

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IP: u16 = 0x0800;
const ARP_REQUEST: u16 = 1;
const BROADCAST: [u8; 6] = [0xff; 6];

const ICMPV6_NEIGHBOUR_ADVERTISEMENT: u8 = 136;
const ND_OVERRIDE: u8 = 0x20;
const ND_SOLICITED: u8 = 0x40;
const ND_TARGET_LINK_LAYER_ADDRESS: u8 = 2;
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

/// Sends announcements on one interface.
#[derive(Debug)]
pub struct Announcer {
    socket: OwnedFd,
    icmpv6: OwnedFd,
    interface: String,
    index: i32,
    mac: [u8; 6],
}

impl Announcer {
    /// A packet socket on `interface` (needs `CAP_NET_RAW`), and its MAC address.
    pub fn new(interface: &str) -> io::Result<Announcer> {
        let name = CString::new(interface).map_err(|_| io::Error::other("an interface name has no NUL"))?;
        // SAFETY: if_nametoindex reads the NUL-terminated name and touches nothing else.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if index == 0 {
            return Err(io::Error::last_os_error());
        }
        let socket = packet_socket(0)?;
        let mac = hardware_address(&socket, &name)?;
        let icmpv6 = icmpv6_socket(index)?;
        Ok(Announcer { socket, icmpv6, interface: interface.to_owned(), index: index as i32, mac })
    }

    /// The interface announcements go out on.
    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// Sends one announcement of `vip` (see the module doc).
    pub fn announce(&self, vip: IpAddr) -> io::Result<()> {
        match vip {
            IpAddr::V4(vip) => self.arp(vip),
            IpAddr::V6(vip) => self.advertise(vip),
        }
    }

    fn advertise(&self, vip: Ipv6Addr) -> io::Result<()> {
        let message = advertisement(self.mac, vip, false);
        // SAFETY: sockaddr_in6 is plain data; all-zero is a valid start.
        let mut to: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        to.sin6_family = libc::AF_INET6 as u16;
        to.sin6_addr.s6_addr = ALL_NODES.octets();
        to.sin6_scope_id = self.index as u32;
        send_to(&self.icmpv6, &message, &to)
    }

    fn arp(&self, vip: Ipv4Addr) -> io::Result<()> {
        let frame = announcement(self.mac, vip);
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid start.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_protocol = ETH_P_ARP.to_be();
        to.sll_ifindex = self.index;
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&BROADCAST);
        send_to(&self.socket, &frame, &to)
    }
}

/// Sends `message` to the socket address `to` (a `sockaddr_ll` or `sockaddr_in6`).
fn send_to<A>(socket: &OwnedFd, message: &[u8], to: &A) -> io::Result<()> {
    // SAFETY: `message` and `to` outlive the call, the lengths are theirs, and `A` is a socket
    // address type the socket's family takes (the callers' types).
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            message.as_ptr().cast(),
            message.len(),
            0,
            std::ptr::from_ref(to).cast(),
            std::mem::size_of::<A>() as libc::socklen_t,
        )
    };
    if sent < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// The ARP payload announcing `vip` at `mac` (the kernel adds the Ethernet header).
pub fn announcement(mac: [u8; 6], vip: Ipv4Addr) -> [u8; 28] {
    let mut frame = [0u8; 28];
    frame[0..2].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    frame[2..4].copy_from_slice(&ETH_P_IP.to_be_bytes());
    frame[4] = 6;
    frame[5] = 4;
    frame[6..8].copy_from_slice(&ARP_REQUEST.to_be_bytes());
    frame[8..14].copy_from_slice(&mac);
    frame[14..18].copy_from_slice(&vip.octets());
    // Target hardware address stays zero: nobody in particular is asked.
    frame[24..28].copy_from_slice(&vip.octets());
    frame
}

/// The ICMPv6 neighbour advertisement of `target` at `mac`, with the Override flag, solicited
/// (an answer) or not (an announcement); the checksum is left to the kernel.
pub fn advertisement(mac: [u8; 6], target: Ipv6Addr, solicited: bool) -> [u8; 32] {
    let mut message = [0u8; 32];
    message[0] = ICMPV6_NEIGHBOUR_ADVERTISEMENT;
    message[4] = ND_OVERRIDE | if solicited { ND_SOLICITED } else { 0 }; // never a router
    message[8..24].copy_from_slice(&target.octets());
    message[24] = ND_TARGET_LINK_LAYER_ADDRESS;
    message[25] = 1; // in units of 8 bytes
    message[26..32].copy_from_slice(&mac);
    message
}

/// An `AF_PACKET` datagram socket for ARP frames, with `flags` (e.g. `SOCK_NONBLOCK`).
fn packet_socket(flags: libc::c_int) -> io::Result<OwnedFd> {
    let kind = libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | flags;
    // SAFETY: socket(2) with constant arguments; the descriptor is owned right away.
    let fd = unsafe { libc::socket(libc::AF_PACKET, kind, i32::from(ETH_P_ARP.to_be())) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A raw ICMPv6 socket, with `flags`.
fn raw_icmpv6(flags: libc::c_int) -> io::Result<OwnedFd> {
    let kind = libc::SOCK_RAW | libc::SOCK_CLOEXEC | flags;
    // SAFETY: socket(2) with constant arguments; the descriptor is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET6, kind, libc::IPPROTO_ICMPV6) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// setsockopt(2) of a plain-data `value`.
fn set_option<T>(socket: &OwnedFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` outlives the call and its size is given; `T` is the option's C type (the
    // callers').
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(value).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if set < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// A raw ICMPv6 socket that sends on interface `index` with the hop limit neighbour discovery
/// requires, to multicast and unicast destinations alike.
fn icmpv6_socket(index: u32) -> io::Result<OwnedFd> {
    let socket = raw_icmpv6(0)?;
    let hops: libc::c_int = 255;
    set_option(&socket, libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_HOPS, &hops)?;
    set_option(&socket, libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS, &hops)?;
    set_option(&socket, libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_IF, &(index as libc::c_int))?;
    Ok(socket)
}

/// `struct ifreq` as `SIOCGIFHWADDR` fills it: the name, then a `sockaddr` (the union's other
/// members are no larger on 64-bit Linux than the 24 bytes here).
#[repr(C)]
struct HardwareAddressRequest {
    name: [libc::c_char; libc::IFNAMSIZ],
    family: libc::sa_family_t,
    address: [u8; 14],
    _rest: [u8; 8],
}

/// The interface's MAC address, asked of the kernel through `socket` (so in its network
/// namespace: sysfs shows the namespace that mounted it).
fn hardware_address(socket: &OwnedFd, name: &CString) -> io::Result<[u8; 6]> {
    let bytes = name.as_bytes();
    if bytes.len() >= libc::IFNAMSIZ {
        return Err(io::Error::other("an interface name has at most 15 bytes"));
    }
    let mut request =
        HardwareAddressRequest { name: [0; libc::IFNAMSIZ], family: 0, address: [0; 14], _rest: [0; 8] };
    for (to, from) in request.name.iter_mut().zip(bytes) {
        *to = *from as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR reads the name and writes the address within the request, which
    // outlives the call and has ifreq's size.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFHWADDR, std::ptr::from_mut(&mut request)) } < 0 {
        return Err(io::Error::last_os_error());
    }
    if request.family != libc::ARPHRD_ETHER {
        return Err(io::Error::other("not an Ethernet interface"));
    }
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&request.address[..6]);
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_announcement_asks_for_the_vip_from_the_vip() {
        let mac = [0x02, 0, 0, 0, 0, 0x42];
        let frame = announcement(mac, Ipv4Addr::new(192, 0, 2, 7));
        assert_eq!(&frame[..8], &[0, 1, 8, 0, 6, 4, 0, 1], "Ethernet/IPv4 request");
        assert_eq!(&frame[8..14], &mac);
        assert_eq!(&frame[14..18], &[192, 0, 2, 7]);
        assert_eq!(&frame[18..24], &[0; 6]);
        assert_eq!(&frame[24..28], &[192, 0, 2, 7]);
    }

    #[test]
    fn an_advertisement_overrides_with_the_target_link_layer_address() {
        let mac = [0x02, 0, 0, 0, 0, 0x42];
        let vip = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7);
        let message = advertisement(mac, vip, false);
        assert_eq!(&message[..8], &[136, 0, 0, 0, 0x20, 0, 0, 0], "NA, Override only");
        assert_eq!(advertisement(mac, vip, true)[4], 0x60, "an answer is Solicited too");
        assert_eq!(&message[8..24], &vip.octets());
        assert_eq!(&message[24..26], &[2, 1], "one 8-byte target link-layer address option");
        assert_eq!(&message[26..32], &mac);
    }
}
