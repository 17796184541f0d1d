//! Failures that are the load balancer's own trouble, not a backend's: no free source port, no
//! descriptor, no memory. They must never count against a backend (no outlier ejection, no failed
//! health probe); the datapath and the health checks count them apart, by [`LocalResource`].
//!
//! The errno values are Linux's generic ones (`asm-generic/errno*.h`, used by x86-64, aarch64,
//! riscv64 and arm); lb-core has no libc, so lb-datapath's tests check them against libc's.

/// What the machine ran out of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LocalResource {
    /// `EADDRNOTAVAIL`: no free source port (or address) towards that destination.
    SourcePorts,
    /// `EMFILE`, `ENFILE`: the process's or the system's file descriptors.
    Descriptors,
    /// `ENOBUFS`, `ENOMEM`: kernel buffers or memory.
    Memory,
}

/// Linux's generic errno values of the failures above.
pub mod errno {
    pub const ENOMEM: i32 = 12;
    pub const ENFILE: i32 = 23;
    pub const EMFILE: i32 = 24;
    pub const EADDRNOTAVAIL: i32 = 99;
    pub const ENOBUFS: i32 = 105;
}

impl LocalResource {
    /// The local resource an `errno` says is exhausted, if it says so.
    pub fn of_errno(errno: i32) -> Option<LocalResource> {
        match errno {
            errno::EADDRNOTAVAIL => Some(LocalResource::SourcePorts),
            errno::EMFILE | errno::ENFILE => Some(LocalResource::Descriptors),
            errno::ENOBUFS | errno::ENOMEM => Some(LocalResource::Memory),
            _ => None,
        }
    }

    /// [`LocalResource::of_errno`] of an I/O error's OS code.
    pub fn of_io_error(error: &std::io::Error) -> Option<LocalResource> {
        error.raw_os_error().and_then(LocalResource::of_errno)
    }

    pub fn name(self) -> &'static str {
        match self {
            LocalResource::SourcePorts => "source ports",
            LocalResource::Descriptors => "file descriptors",
            LocalResource::Memory => "kernel memory",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_errnos_are_recognised_and_others_are_not() {
        assert_eq!(LocalResource::of_errno(errno::EMFILE), Some(LocalResource::Descriptors));
        assert_eq!(LocalResource::of_errno(errno::ENOBUFS), Some(LocalResource::Memory));
        assert_eq!(LocalResource::of_errno(errno::EADDRNOTAVAIL), Some(LocalResource::SourcePorts));
        // ECONNREFUSED (111), ETIMEDOUT (110), EHOSTUNREACH (113) are the backend's.
        for backend in [111, 110, 113, 104] {
            assert_eq!(LocalResource::of_errno(backend), None);
        }
        let error = std::io::Error::from_raw_os_error(errno::ENFILE);
        assert_eq!(LocalResource::of_io_error(&error), Some(LocalResource::Descriptors));
    }
}
