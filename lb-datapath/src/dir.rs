//! Which way bytes go through the load balancer: the one vocabulary of a relay direction, for TCP
//! connections, SCTP associations and UDP flows alike.
//!
//! A direction is named by where it writes: [`Dir::ToBackend`] reads from the client and writes to
//! the backend (the `*_client_to_backend` counters, `OpKind::ClientToBackend`), [`Dir::ToClient`]
//! the reverse. Its discriminant is its index in the per-direction arrays (`[_; 2]`) and what a UDP
//! send carries as its `user_data` generation, so the two values are fixed.

/// A relay direction. See the module doc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Dir {
    /// Client → backend.
    ToBackend = 0,
    /// Backend → client.
    ToClient = 1,
}

impl Dir {
    /// Both directions, client → backend first (the order a relay starts them in).
    pub const BOTH: [Dir; 2] = [Dir::ToBackend, Dir::ToClient];

    /// The index of this direction in a per-direction array.
    #[inline]
    pub fn index(self) -> usize {
        self as usize
    }

    /// The direction a `user_data` generation of [`Dir::index`] names.
    #[inline]
    pub fn from_index(index: u32) -> Dir {
        if index == Dir::ToBackend as u32 { Dir::ToBackend } else { Dir::ToClient }
    }

    /// The other direction.
    #[inline]
    pub fn reverse(self) -> Dir {
        match self {
            Dir::ToBackend => Dir::ToClient,
            Dir::ToClient => Dir::ToBackend,
        }
    }

    /// `(source, destination)` of this direction, given the client's end and the backend's.
    #[inline]
    pub fn ends<T>(self, client: T, backend: T) -> (T, T) {
        match self {
            Dir::ToBackend => (client, backend),
            Dir::ToClient => (backend, client),
        }
    }
}
