//! Running test code without a capability the test process (root) has: Linux capabilities belong
//! to each thread, so [`without_network_admin`] drops them on a thread of its own, and everything
//! that thread starts (an engine's workers) inherits the reduced set; the rest of the test process
//! keeps its capabilities.

use std::io;

const CAP_NET_ADMIN: u32 = 12;
const CAP_NET_RAW: u32 = 13;
/// `_LINUX_CAPABILITY_VERSION_3`: two data structs, 64 capabilities.
const VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct Header {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Runs `f` on a new thread without `CAP_NET_ADMIN` and `CAP_NET_RAW` (effective and permitted,
/// so nothing can take them back), and returns what it returns. Threads `f` spawns inherit that.
pub fn without_network_admin<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                drop_network_admin().expect("drop CAP_NET_ADMIN and CAP_NET_RAW from this thread");
                f()
            })
            .join()
            .expect("the thread without network capabilities panicked")
    })
}

fn drop_network_admin() -> io::Result<()> {
    let mut header = Header { version: VERSION_3, pid: 0 };
    let mut data = [Data::default(); 2];
    // SAFETY: capget(2) with a version-3 header and the two data structs version 3 expects, both
    // valid for writes for the call; pid 0 is the calling thread.
    let got = unsafe { libc::syscall(libc::SYS_capget, &mut header as *mut Header, data.as_mut_ptr()) };
    if got != 0 {
        return Err(io::Error::last_os_error());
    }
    let network = !((1 << CAP_NET_ADMIN) | (1 << CAP_NET_RAW));
    data[0].effective &= network;
    data[0].permitted &= network;
    // SAFETY: as above; capset(2) only reads them and changes the calling thread's sets only.
    let set = unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()) };
    if set != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
