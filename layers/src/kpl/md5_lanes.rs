//! MD5 of several messages at once, side by side.
//!
//! MD5 is a chain of 64 dependent steps per 64-byte block, so one message keeps a core's
//! vector units idle. Here [`LANES`] messages are hashed together: every step works on one
//! 32-bit word per message, written as plain loops over fixed-size arrays that the compiler
//! turns into SIMD instructions (safe Rust, no `unsafe`, no CPU-specific code). A lane whose
//! message is done takes the next one, so messages of different lengths keep every lane busy.
//! Tests check it against the `md-5` crate.

/// Messages hashed side by side: four 32-bit lanes fill one 128-bit register, which every
/// x86-64 and aarch64 CPU has (eight and sixteen were slower in `benches/deaggregate.rs`: the
/// state no longer fits the registers).
pub(super) const LANES: usize = 4;

/// Below this many messages, hashing them one by one is faster: four lanes hash four
/// messages in about the time one takes 1.5 (`benches/deaggregate.rs`), so two already gain.
pub(super) const MIN_MESSAGES: usize = 2;

type Lanes = [u32; LANES];

const INIT: [u32; 4] = [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476];

/// The sines table of RFC 1321.
const K: [u32; 64] = [
    0xd76aa478, 0xe8c7b756, 0x242070db, 0xc1bdceee, 0xf57c0faf, 0x4787c62a, 0xa8304613, 0xfd469501,
    0x698098d8, 0x8b44f7af, 0xffff5bb1, 0x895cd7be, 0x6b901122, 0xfd987193, 0xa679438e, 0x49b40821,
    0xf61e2562, 0xc040b340, 0x265e5a51, 0xe9b6c7aa, 0xd62f105d, 0x02441453, 0xd8a1e681, 0xe7d3fbc8,
    0x21e1cde6, 0xc33707d6, 0xf4d50d87, 0x455a14ed, 0xa9e3e905, 0xfcefa3f8, 0x676f02d9, 0x8d2a4c8a,
    0xfffa3942, 0x8771f681, 0x6d9d6122, 0xfde5380c, 0xa4beea44, 0x4bdecfa9, 0xf6bb4b60, 0xbebfbc70,
    0x289b7ec6, 0xeaa127fa, 0xd4ef3085, 0x04881d05, 0xd9d4d039, 0xe6db99e5, 0x1fa27cf8, 0xc4ac5665,
    0xf4292244, 0x432aff97, 0xab9423a7, 0xfc93a039, 0x655b59c3, 0x8f0ccc92, 0xffeff47d, 0x85845dd1,
    0x6fa87e4f, 0xfe2ce6e0, 0xa3014314, 0x4e0811a1, 0xf7537e82, 0xbd3af235, 0x2ad7d2bb, 0xeb86d391,
];

/// The message word each step of a round reads.
const WORDS: [[usize; 16]; 4] = [
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
    [1, 6, 11, 0, 5, 10, 15, 4, 9, 14, 3, 8, 13, 2, 7, 12],
    [5, 8, 11, 14, 1, 4, 7, 10, 13, 0, 3, 6, 9, 12, 15, 2],
    [0, 7, 14, 5, 12, 3, 10, 1, 8, 15, 6, 13, 4, 11, 2, 9],
];

/// The rotations of the four steps of each group of four, per round.
const SHIFTS: [[u32; 4]; 4] = [
    [7, 12, 17, 22],
    [5, 9, 14, 20],
    [4, 11, 16, 23],
    [6, 10, 15, 21],
];

/// The MD5 digest of each message, in order.
pub(super) fn digests(messages: &[&[u8]]) -> Vec<[u8; 16]> {
    let mut out = vec![[0u8; 16]; messages.len()];
    let mut state = [[0u32; LANES]; 4];
    let mut jobs: [Option<Job<'_>>; LANES] = [None; LANES];
    let mut next = 0;
    let mut block = [[0u32; LANES]; 16];
    loop {
        let mut busy = false;
        for (lane, job) in jobs.iter_mut().enumerate() {
            if job.is_none() && next < messages.len() {
                *job = Some(Job::new(next, messages[next]));
                next += 1;
                for (word, init) in state.iter_mut().zip(INIT) {
                    word[lane] = init;
                }
            }
            if let Some(job) = job {
                job.load(lane, &mut block);
                busy = true;
            }
        }
        if !busy {
            return out;
        }
        compress(&mut state, &block);
        for (lane, slot) in jobs.iter_mut().enumerate() {
            if let Some(job) = slot {
                job.block += 1;
                if job.block == job.blocks {
                    for (i, word) in state.iter().enumerate() {
                        out[job.index][4 * i..4 * i + 4].copy_from_slice(&word[lane].to_le_bytes());
                    }
                    *slot = None;
                }
            }
        }
    }
}

/// One message being hashed in a lane.
#[derive(Clone, Copy)]
struct Job<'a> {
    index: usize,
    data: &'a [u8],
    /// The next block to hash, and how many the padded message has.
    block: usize,
    blocks: usize,
}

impl<'a> Job<'a> {
    fn new(index: usize, data: &'a [u8]) -> Self {
        Self {
            index,
            data,
            block: 0,
            // The message, 0x80, zeros, and its length in bits in 8 bytes.
            blocks: (data.len() + 8) / 64 + 1,
        }
    }

    /// Puts the words of the next block into `lane` of `block`.
    fn load(&self, lane: usize, block: &mut [Lanes; 16]) {
        let start = self.block * 64;
        let bytes: [u8; 64] = match self.data.get(start..start + 64) {
            Some(whole) => whole.try_into().unwrap_or([0; 64]),
            None => self.padded(start),
        };
        for (word, chunk) in block.iter_mut().zip(bytes.chunks_exact(4)) {
            word[lane] = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
    }

    /// The block at `start` of the padded message, past the message's whole blocks.
    fn padded(&self, start: usize) -> [u8; 64] {
        let len = self.data.len();
        let mut bytes = [0u8; 64];
        if start < len {
            bytes[..len - start].copy_from_slice(&self.data[start..]);
        }
        if (start..start + 64).contains(&len) {
            bytes[len - start] = 0x80;
        }
        if self.block + 1 == self.blocks {
            bytes[56..].copy_from_slice(&((len as u64).wrapping_mul(8)).to_le_bytes());
        }
        bytes
    }
}

/// One block per lane into the lanes' states.
fn compress(state: &mut [Lanes; 4], block: &[Lanes; 16]) {
    let [mut a, mut b, mut c, mut d] = *state;
    round(&mut a, &mut b, &mut c, &mut d, block, 0, |x, y, z| {
        z ^ (x & (y ^ z))
    });
    round(&mut a, &mut b, &mut c, &mut d, block, 1, |x, y, z| {
        y ^ (z & (x ^ y))
    });
    round(&mut a, &mut b, &mut c, &mut d, block, 2, |x, y, z| {
        x ^ y ^ z
    });
    round(&mut a, &mut b, &mut c, &mut d, block, 3, |x, y, z| {
        y ^ (x | !z)
    });
    for (word, new) in state.iter_mut().zip([a, b, c, d]) {
        for l in 0..LANES {
            word[l] = word[l].wrapping_add(new[l]);
        }
    }
}

/// The 16 steps of round `r`, four at a time so the roles of a, b, c, d come back in place.
#[inline(always)]
fn round(
    a: &mut Lanes,
    b: &mut Lanes,
    c: &mut Lanes,
    d: &mut Lanes,
    block: &[Lanes; 16],
    r: usize,
    f: impl Fn(u32, u32, u32) -> u32 + Copy,
) {
    let [s0, s1, s2, s3] = SHIFTS[r];
    for q in 0..4 {
        let i = 4 * q;
        step(a, b, c, d, &block[WORDS[r][i]], K[16 * r + i], s0, f);
        step(
            d,
            a,
            b,
            c,
            &block[WORDS[r][i + 1]],
            K[16 * r + i + 1],
            s1,
            f,
        );
        step(
            c,
            d,
            a,
            b,
            &block[WORDS[r][i + 2]],
            K[16 * r + i + 2],
            s2,
            f,
        );
        step(
            b,
            c,
            d,
            a,
            &block[WORDS[r][i + 3]],
            K[16 * r + i + 3],
            s3,
            f,
        );
    }
}

/// `a = b + ((a + f(b, c, d) + k + word) <<< s)`, in every lane.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn step(
    a: &mut Lanes,
    b: &Lanes,
    c: &Lanes,
    d: &Lanes,
    word: &Lanes,
    k: u32,
    s: u32,
    f: impl Fn(u32, u32, u32) -> u32,
) {
    for l in 0..LANES {
        let sum = a[l]
            .wrapping_add(f(b[l], c[l], d[l]))
            .wrapping_add(k)
            .wrapping_add(word[l]);
        a[l] = b[l].wrapping_add(sum.rotate_left(s));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use md5::{Digest, Md5};
    use proptest::prelude::*;

    fn reference(messages: &[Vec<u8>]) -> Vec<[u8; 16]> {
        messages.iter().map(|m| Md5::digest(m).into()).collect()
    }

    fn lanes(messages: &[Vec<u8>]) -> Vec<[u8; 16]> {
        digests(&messages.iter().map(Vec::as_slice).collect::<Vec<_>>())
    }

    #[test]
    fn known_digests() {
        let messages = [b"".to_vec(), b"abc".to_vec()];
        assert_eq!(
            lanes(&messages),
            vec![
                *b"\xd4\x1d\x8c\xd9\x8f\x00\xb2\x04\xe9\x80\x09\x98\xec\xf8\x42\x7e",
                *b"\x90\x01\x50\x98\x3c\xd2\x4f\xb0\xd6\x96\x3f\x7d\x28\xe1\x7f\x72",
            ]
        );
    }

    #[test]
    fn every_length_around_the_padding_edges() {
        // Lengths 0..=200 cover a message ending just before, at and after the length field
        // of a block, in every lane, with lanes refilled at different times.
        let messages: Vec<Vec<u8>> = (0..=200u32)
            .map(|n| (0..n).map(|i| (i * 31 + n) as u8).collect())
            .collect();
        assert_eq!(lanes(&messages), reference(&messages));
        assert!(lanes(&[]).is_empty());
    }

    proptest! {
        #[test]
        fn matches_md5_crate(messages in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..2000), 0..20)) {
            prop_assert_eq!(lanes(&messages), reference(&messages));
        }
    }
}
