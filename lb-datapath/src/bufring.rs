//! Provided-buffer rings: buffers registered with a worker's io_uring (5.19+) that the kernel picks
//! from only when data arrives, so a receive that waits holds no memory.
//!
//! A worker registers one ring per use, each under its own buffer group: UDP datagrams
//! ([`crate::udp`]) and copy-relay receives of TCP connections ([`crate::tcp::relay::copy`]). The
//! memory is one anonymous mapping per ring: a page is resident only once the kernel has written
//! into it, so a ring of large buffers that only ever carries small messages stays small.
//!
//! Invariants: a buffer id is either in the ring (the kernel's to pick) or lent to exactly one
//! owner, who hands it back once its bytes are used ([`BufRing::recycle`]); memory the kernel
//! might still write is never unmapped (a worker whose operations outlive its stop grace leaks the
//! ring with them).

use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;

use crate::ring::Ring;

/// Anonymous private memory, unmapped on drop.
struct Mapping {
    base: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> io::Result<Mapping> {
        // SAFETY: an anonymous private mapping with no address hint; the result is checked.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { base: base.cast(), len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the region `new` mapped, once.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// A registered ring of `count` provided buffers of `size` bytes each. See the module doc.
pub(crate) struct BufRing {
    entries: Mapping,
    buffers: Mapping,
    count: u16,
    size: usize,
    group: u16,
    tail: u16,
}

impl BufRing {
    /// Maps and registers a ring of `count` buffers (rounded to a power of two, 1..=32768) of
    /// `size` bytes (rounded up to whole pages) under buffer group `group`.
    pub fn register(ring: &Ring, count: u16, size: usize, group: u16) -> io::Result<BufRing> {
        let count = count.clamp(1, 1 << 15).next_power_of_two();
        let size = size.clamp(1, u32::MAX as usize & !4095).next_multiple_of(4096);
        let entries = Mapping::new(usize::from(count) * std::mem::size_of::<BufRingEntry>())?;
        let buffers = Mapping::new(usize::from(count) * size)?;
        let mut ring_buffers = BufRing { entries, buffers, count, size, group, tail: 0 };
        // SAFETY: the entry array is page-aligned (mmap), sized for `count` entries, and owned by the
        // returned value, which the worker keeps (or leaks) for as long as the io_uring exists.
        unsafe { ring.register_buf_ring(ring_buffers.entries.base as u64, count, group)? };
        for bid in 0..count {
            ring_buffers.push(bid);
        }
        ring_buffers.publish_tail();
        Ok(ring_buffers)
    }

    /// Number of buffers (buffer ids are `0..count`).
    pub fn count(&self) -> usize {
        usize::from(self.count)
    }

    /// Bytes per buffer.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The buffer group receives name to draw from this ring.
    pub fn group(&self) -> u16 {
        self.group
    }

    /// The first `len` bytes the kernel wrote into buffer `bid`.
    pub fn filled(&self, bid: u16, len: usize) -> &[u8] {
        let bid = usize::from(bid % self.count);
        // SAFETY: `bid` is within the mapping; the kernel finished writing this buffer (its completion
        // was reaped) and will not touch it again before it is recycled.
        unsafe { std::slice::from_raw_parts(self.buffers.base.add(bid * self.size), len.min(self.size)) }
    }

    /// Hands buffer `bid` back to the kernel.
    pub fn recycle(&mut self, bid: u16) {
        self.push(bid % self.count);
        self.publish_tail();
    }

    /// Hands buffers `bids` back to the kernel, publishing them once.
    pub fn recycle_all(&mut self, bids: &[u16]) {
        for &bid in bids {
            self.push(bid % self.count);
        }
        self.publish_tail();
    }

    fn push(&mut self, bid: u16) {
        let slot = usize::from(self.tail & (self.count - 1));
        // SAFETY: `slot` < count, inside the entry mapping; the kernel only reads entries below the
        // published tail, and this one is past it until `publish_tail`.
        let entry = unsafe { &mut *self.entries.base.cast::<BufRingEntry>().add(slot) };
        // SAFETY: `bid` < count, so the address is inside the buffer mapping.
        entry.set_addr(unsafe { self.buffers.base.add(usize::from(bid) * self.size) } as u64);
        entry.set_len(self.size as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    fn publish_tail(&self) {
        // SAFETY: the ring base is page-aligned and mapped; the tail is a u16 inside its first entry
        // that the kernel reads concurrently, hence the atomic release store.
        unsafe {
            let tail = BufRingEntry::tail(self.entries.base.cast::<BufRingEntry>()).cast_mut();
            AtomicU16::from_ptr(tail).store(self.tail, Ordering::Release);
        }
    }
}
