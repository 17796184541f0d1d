//! Gratuitous ARP: telling the neighbours on an interface (`--announce-interface`) that an IPv4
//! VIP now lives at this host's MAC address, so that routers and clients that cached another owner
//! switch at once instead of when their entry expires (minutes on many switches).
//!
//! An announcement is an ARP request for the VIP from the VIP (RFC 5227's announcement: sender and
//! target address equal, target hardware address zero), broadcast through a packet socket; Linux
//! and common switches take it as a reason to override an existing entry. It is sent
//! [`REPEATS`] times, [`SPACING`] apart, because a single frame can be lost.
//!
//! The kernel itself answers ARP requests for an address of any of its links (`arp_ignore=0`, the
//! default), so a VIP on ringlb's VIP link is answered on the announcing interface without help.
//! IPv6 (unsolicited neighbour advertisements) is not done yet.

use std::ffi::CString;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// How many times each announcement is sent.
pub const REPEATS: usize = 3;

/// The time between two sends of one announcement.
pub const SPACING: Duration = Duration::from_millis(500);

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IP: u16 = 0x0800;
const ARP_REQUEST: u16 = 1;
const BROADCAST: [u8; 6] = [0xff; 6];

/// Sends gratuitous ARP on one interface.
#[derive(Debug)]
pub struct Announcer {
    socket: OwnedFd,
    interface: String,
    index: i32,
    mac: [u8; 6],
}

impl Announcer {
    /// A packet socket on `interface` (needs `CAP_NET_RAW`); its MAC is read from sysfs.
    pub fn new(interface: &str) -> io::Result<Announcer> {
        let name = CString::new(interface).map_err(|_| io::Error::other("an interface name has no NUL"))?;
        // SAFETY: if_nametoindex reads the NUL-terminated name and touches nothing else.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if index == 0 {
            return Err(io::Error::last_os_error());
        }
        let mac = read_mac(interface)?;
        // SAFETY: socket(2) with constant arguments; the descriptor is owned right away.
        let fd = unsafe {
            libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, i32::from(ETH_P_ARP.to_be()))
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Announcer { socket, interface: interface.to_owned(), index: index as i32, mac })
    }

    /// The interface announcements go out on.
    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// Broadcasts one announcement of `vip` (see the module doc).
    pub fn announce(&self, vip: Ipv4Addr) -> io::Result<()> {
        let frame = announcement(self.mac, vip);
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid start.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_protocol = ETH_P_ARP.to_be();
        to.sll_ifindex = self.index;
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&BROADCAST);
        // SAFETY: `frame` and `to` outlive the call, and the lengths are theirs.
        let sent = unsafe {
            libc::sendto(
                self.socket.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                std::ptr::from_ref(&to).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if sent < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }
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

fn read_mac(interface: &str) -> io::Result<[u8; 6]> {
    let text = std::fs::read_to_string(format!("/sys/class/net/{interface}/address"))?;
    let mut mac = [0u8; 6];
    let mut parts = text.trim().split(':');
    for byte in &mut mac {
        let part = parts.next().ok_or_else(|| io::Error::other(format!("{interface} has no MAC address")))?;
        *byte = u8::from_str_radix(part, 16)
            .map_err(|_| io::Error::other(format!("{interface}: bad MAC {text:?}")))?;
    }
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
}
