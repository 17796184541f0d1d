//! Stable hashing for schedulers that must agree across builds, platforms and ringlb instances
//! (Maglev, ring hash, source/destination hashing).
//!
//! XXH64 (Yann Collet's xxHash, 64-bit) written out here rather than taken from `std` (whose
//! `DefaultHasher` may change between Rust releases and is randomly keyed in `HashMap`) or from a
//! crate (one more dependency for ~60 lines). The test vectors below come from the reference C
//! implementation. Inputs are canonical byte encodings ([`encode_socket_addr`], [`encode_ip`]), never
//! `Hash` impls, so the output cannot change with a compiler or a struct layout.
//! Must never depend on the platform's endianness or pointer width: every read is little-endian.

use std::net::{IpAddr, SocketAddr};

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;
const P5: u64 = 0x27D4_EB2F_1656_67C5;

/// Seeds of the independent hash functions the schedulers use; changing one changes every table.
pub mod seed {
    /// Maglev permutation offset of a backend.
    pub const MAGLEV_OFFSET: u64 = 0;
    /// Maglev permutation skip of a backend (must differ from the offset seed: the paper's two hashes).
    pub const MAGLEV_SKIP: u64 = 1;
    /// A client (or destination) key looked up in a table or ring.
    pub const LOOKUP: u64 = 2;
    /// A ring-hash virtual node.
    pub const RING_NODE: u64 = 3;
}

fn read_u64(bytes: &[u8]) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(word)
}

fn read_u32(bytes: &[u8]) -> u64 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[..4]);
    u64::from(u32::from_le_bytes(word))
}

fn round(acc: u64, input: u64) -> u64 {
    acc.wrapping_add(input.wrapping_mul(P2)).rotate_left(31).wrapping_mul(P1)
}

fn merge_round(acc: u64, value: u64) -> u64 {
    (acc ^ round(0, value)).wrapping_mul(P1).wrapping_add(P4)
}

/// XXH64 of `input` with `seed`.
pub fn xxh64(input: &[u8], seed: u64) -> u64 {
    let mut rest = input;
    let mut hash = if input.len() >= 32 {
        let mut v =
            [seed.wrapping_add(P1).wrapping_add(P2), seed.wrapping_add(P2), seed, seed.wrapping_sub(P1)];
        while rest.len() >= 32 {
            for (i, lane) in v.iter_mut().enumerate() {
                *lane = round(*lane, read_u64(&rest[i * 8..]));
            }
            rest = &rest[32..];
        }
        let mut hash = v[0]
            .rotate_left(1)
            .wrapping_add(v[1].rotate_left(7))
            .wrapping_add(v[2].rotate_left(12))
            .wrapping_add(v[3].rotate_left(18));
        for lane in v {
            hash = merge_round(hash, lane);
        }
        hash
    } else {
        seed.wrapping_add(P5)
    };
    hash = hash.wrapping_add(input.len() as u64);
    while rest.len() >= 8 {
        hash = (hash ^ round(0, read_u64(rest))).rotate_left(27).wrapping_mul(P1).wrapping_add(P4);
        rest = &rest[8..];
    }
    if rest.len() >= 4 {
        hash = (hash ^ read_u32(rest).wrapping_mul(P1)).rotate_left(23).wrapping_mul(P2).wrapping_add(P3);
        rest = &rest[4..];
    }
    for &byte in rest {
        hash = (hash ^ u64::from(byte).wrapping_mul(P5)).rotate_left(11).wrapping_mul(P1);
    }
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(P2);
    hash ^= hash >> 29;
    hash = hash.wrapping_mul(P3);
    hash ^ (hash >> 32)
}

/// Canonical bytes of an IP: 4 bytes for IPv4 (also for IPv4-mapped IPv6), else 16, network order.
pub fn encode_ip(ip: IpAddr, out: &mut [u8; 18]) -> usize {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            out[..4].copy_from_slice(&v4.octets());
            4
        }
        IpAddr::V6(v6) => {
            out[..16].copy_from_slice(&v6.octets());
            16
        }
    }
}

/// Canonical bytes of an address: [`encode_ip`] then the port big-endian.
pub fn encode_socket_addr(addr: SocketAddr, out: &mut [u8; 18]) -> usize {
    let len = encode_ip(addr.ip(), out);
    out[len..len + 2].copy_from_slice(&addr.port().to_be_bytes());
    len + 2
}

/// XXH64 of an address's canonical bytes.
pub fn hash_socket_addr(addr: SocketAddr, seed: u64) -> u64 {
    let mut buf = [0u8; 18];
    let len = encode_socket_addr(addr, &mut buf);
    xxh64(&buf[..len], seed)
}

/// XXH64 of an IP's canonical bytes.
pub fn hash_ip(ip: IpAddr, seed: u64) -> u64 {
    let mut buf = [0u8; 18];
    let len = encode_ip(ip, &mut buf);
    xxh64(&buf[..len], seed)
}

/// SplitMix64: a tiny seeded generator for jitter and default random values. Not for secrets.
#[derive(Debug, Clone, Default)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xxh64_matches_the_reference_implementation() {
        let hundred: Vec<u8> = (0..100).collect();
        let cases: [(&[u8], u64, u64); 8] = [
            (b"", 0, 0xef46db3751d8e999),
            (b"", 1, 0xd5afba1336a3be4b),
            (b"a", 0, 0xd24ec4f1a98c6e5b),
            (b"abc", 0, 0x44bc2cf5ad770999),
            (b"abc", 1, 0xbea9ca8199328908),
            (b"abc", 0x9E3779B97F4A7C15, 0x2ed0f59d6b43ac8b),
            (b"0123456789abcdef0123456789abcdef0123", 0, 0xc4255ba3d1af5461),
            (&hundred, 1, 0x3d19a3a2098a7023),
        ];
        for (input, seed, expected) in cases {
            assert_eq!(xxh64(input, seed), expected, "input of {} bytes, seed {seed}", input.len());
        }
    }

    #[test]
    fn ipv4_mapped_addresses_hash_like_ipv4() {
        let v4: SocketAddr = "10.0.0.1:80".parse().expect("addr");
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:80".parse().expect("addr");
        assert_eq!(hash_socket_addr(v4, 7), hash_socket_addr(mapped, 7));
        assert_ne!(hash_socket_addr(v4, 7), hash_socket_addr("10.0.0.1:81".parse().expect("addr"), 7));
    }
}
