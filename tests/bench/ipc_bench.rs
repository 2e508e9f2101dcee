//! `ipc-bench`: whether handing a large job payload (JSON text) from one thread to another through
//! a memfd (shared memory) beats writing it through a Unix socketpair, and above what size; run by
//! hand, not by CI.
//!
//! Every message is one realistic one-way handoff: the sender thread holds the payload (JSON text
//! it has just produced) and the receiver thread, blocked on the socket, ends up with something it
//! can parse: a `String` it owns (`String::from_utf8` included), or, for the in-place variants, a
//! `&str` into the mapping (`std::str::from_utf8` included). The time of one message runs from the
//! sender's first step to the moment the receiver holds that text; the receiver's teardown (drop,
//! `munmap`, `close`) comes after and is not timed, in every variant. The sender waits for the
//! receiver's acknowledgement before the next message, so messages never overlap. Variants:
//!
//! - **socket**: 8-byte length prefix and the bytes with `write_all` (no extra copy on the
//!   sender); the receiver reads the prefix, allocates a `Vec` of that length and `read_exact`s.
//! - **memfd fresh**: per message the sender `memfd_create`s, `write_all`s the bytes into it and
//!   sends the length and the fd; the receiver then either `pread`s it into a `Vec` it allocates
//!   (`read_exact_at`), or `mmap`s it read-only and copies the mapping into a `Vec`, or `mmap`s it
//!   and uses the mapping in place (no copy: the best case, which our host cannot use as is,
//!   since it needs an owned `String`).
//! - **memfd reused**: one memfd per size, created, sized and handed over once before the
//!   messages, mapped once by the receiver; per message the sender `pwrite`s the bytes at offset 0
//!   and sends the length. The receiver `pread`s into a `Vec`, or copies from its standing mapping
//!   into a `Vec`, or uses the standing mapping in place. (Reuse needs the acknowledgement this
//!   bench already has: the sender must not overwrite a payload the receiver still reads.)
//! - **(ref) from_utf8**: not a transfer: `std::str::from_utf8` over the warm payload in one
//!   thread, the validation share that every variant above includes.
//!
//! Stand-in: both threads live in one process, so the memfd's `OwnedFd` travels through an
//! in-process channel and only its number (8 bytes, after the length) goes through the socket,
//! instead of a real `SCM_RIGHTS` message. Between processes, passing the fd adds one
//! `sendmsg`/`recvmsg` with a control message per fresh memfd: a fixed cost per message that only
//! the smallest sizes would notice. A real design would also seal the memfd (`F_SEAL_SHRINK`), so
//! the receiver cannot get SIGBUS from a shrunk file.
//!
//! The table: per size and variant, the median and p90 time of one message in µs, the throughput
//! at the median in GB/s (10^9 bytes per second), and `vs socket`, the variant's median divided by
//! the socket's median at the same size: below 1.00 the variant is faster than the socket, above
//! 1.00 slower. Iterations per size are fixed (more for small sizes, after a few unmeasured
//! warm-up messages) and capped by a time budget per cell, so the whole run stays under a minute
//! on 2 cores; the `n` column says how many messages were measured. Every warm-up message is
//! checked byte for byte against the payload; the bench exits 1 if one differs.
//!
//! ```text
//! cargo run --release -p e2e --bin ipc-bench
//! ```

#[path = "common.rs"]
#[allow(dead_code)] // ipc-bench needs only the machine's description
mod common;

use nix::errno::Errno;
use nix::libc::c_void;
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use std::fs::File;
use std::hint::black_box;
use std::io::{ErrorKind, Read, Write};
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::ptr::NonNull;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// An error from either thread, with what it was doing.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

/// The payload sizes and how many messages to measure at each.
const SIZES: [(usize, usize); 5] = [
    (64 * KIB, 2000),
    (MIB, 400),
    (4 * MIB, 150),
    (16 * MIB, 60),
    (64 * MIB, 50),
];
/// Unmeasured messages before each cell (page cache, allocator, branch predictors), all checked.
const WARM_UP: usize = 3;
/// Measuring time per cell (size and variant) after which it stops early, to bound the run.
const CELL_BUDGET: Duration = Duration::from_secs(4);

/// One way of moving the payload from the sender to the receiver.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Variant {
    Socket,
    FreshPread,
    FreshMmapCopy,
    FreshMmapInPlace,
    ReusedPread,
    ReusedMapCopy,
    ReusedMapInPlace,
}

impl Variant {
    /// Every variant, in table order (socket first: the others are compared with it).
    const ALL: [Variant; 7] = [
        Variant::Socket,
        Variant::FreshPread,
        Variant::FreshMmapCopy,
        Variant::FreshMmapInPlace,
        Variant::ReusedPread,
        Variant::ReusedMapCopy,
        Variant::ReusedMapInPlace,
    ];

    /// The variant's row label.
    fn label(self) -> &'static str {
        match self {
            Variant::Socket => "socket: write_all -> read_exact into Vec",
            Variant::FreshPread => "memfd fresh: write -> pread into Vec",
            Variant::FreshMmapCopy => "memfd fresh: write -> mmap, copy into Vec",
            Variant::FreshMmapInPlace => "memfd fresh: write -> mmap, in place",
            Variant::ReusedPread => "memfd reused: pwrite -> pread into Vec",
            Variant::ReusedMapCopy => "memfd reused: pwrite -> mapped, copy into Vec",
            Variant::ReusedMapInPlace => "memfd reused: pwrite -> mapped, in place",
        }
    }

    /// Whether a fresh memfd is made (and handed over) per message.
    fn fresh(self) -> bool {
        matches!(
            self,
            Variant::FreshPread | Variant::FreshMmapCopy | Variant::FreshMmapInPlace
        )
    }

    /// Whether one memfd is made once and written again for every message.
    fn reused(self) -> bool {
        matches!(
            self,
            Variant::ReusedPread | Variant::ReusedMapCopy | Variant::ReusedMapInPlace
        )
    }
}

/// A read-only shared mapping of the first `len` bytes of a memfd; unmapped when dropped.
struct Mapping {
    ptr: NonNull<c_void>,
    len: NonZeroUsize,
}

impl Mapping {
    /// Maps the first `len` bytes of `fd` read-only (`MAP_SHARED | MAP_POPULATE`: the pages are
    /// mapped in one go instead of one fault at a time); the file must be at least `len` long.
    fn new(fd: impl AsFd, len: usize) -> nix::Result<Mapping> {
        let len = NonZeroUsize::new(len).ok_or(Errno::EINVAL)?;
        let flags = MapFlags::MAP_SHARED | MapFlags::MAP_POPULATE;
        // SAFETY: with no address hint the kernel picks a fresh range, so the new mapping
        // replaces nothing and aliases no Rust object; it is read-only and owned by the returned
        // value, which unmaps it exactly once, in `Drop`.
        let ptr = unsafe { mmap(None, len, ProtFlags::PROT_READ, flags, fd, 0)? };
        Ok(Mapping { ptr, len })
    }

    /// The mapped bytes.
    fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr..ptr + len` stays mapped and readable while `self` lives (only `Drop`
        // unmaps it), and the slice cannot outlive `&self`. The sender sized the file to at
        // least `len` before handing it over and never shrinks it, so reads cannot fault; and it
        // writes the file only after the receiver's acknowledgement, which is sent after every
        // slice of the previous message is gone, so the bytes do not change while borrowed.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<u8>(), self.len.get()) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr` and `len` are exactly one mapping made by `Mapping::new`, unmapped only
        // here, and no slice from `bytes` outlives the `&self` it was borrowed from.
        let result = unsafe { munmap(self.ptr, self.len.get()) };
        debug_assert!(result.is_ok(), "munmap failed: {result:?}");
    }
}

/// The receiver's side of one cell: the socket end and the channel the fds come through.
struct Receiver {
    variant: Variant,
    stream: UnixStream,
    fds: mpsc::Receiver<OwnedFd>,
}

/// For the reused variants: the memfd handed over once before the messages, and the receiver's
/// standing mapping of it (for the mapped variants).
struct Reused {
    file: File,
    mapping: Option<Mapping>,
}

impl Reused {
    /// The first `len` bytes of the standing mapping.
    fn mapped(&self, len: usize) -> Result<&[u8], BoxError> {
        let bytes = self.mapping.as_ref().ok_or("no standing mapping")?.bytes();
        Ok(bytes.get(..len).ok_or("payload larger than the mapping")?)
    }
}

impl Receiver {
    /// Reads a little-endian header of `N` words; `None` when the sender closed the socket.
    fn header<const N: usize>(&mut self) -> Result<Option<[u64; N]>, BoxError> {
        let mut raw = [0u8; 16];
        let raw = &mut raw[..N * 8];
        match self.stream.read_exact(raw) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(format!("reading the header: {e}").into()),
        }
        let mut words = [0u64; N];
        for (word, bytes) in words.iter_mut().zip(raw.chunks_exact(8)) {
            *word = u64::from_le_bytes(bytes.try_into().expect("8 bytes"));
        }
        Ok(Some(words))
    }

    /// Takes the fd the sender put in the channel and checks it is the one the header names.
    fn fresh_fd(&self, number: u64) -> Result<File, BoxError> {
        let fd = self.fds.try_recv().map_err(|e| format!("no fd: {e}"))?;
        if u64::try_from(fd.as_raw_fd()).ok() != Some(number) {
            return Err(format!("fd {} arrived, the header says {number}", fd.as_raw_fd()).into());
        }
        Ok(File::from(fd))
    }

    /// Receives one message; returns when the receiver held the text (the timed end), after
    /// comparing it with `expected` when given. `None` when the sender is done. `reused` is the
    /// standing memfd of the reused variants.
    fn receive(
        &mut self,
        reused: Option<&Reused>,
        expected: Option<&[u8]>,
    ) -> Result<Option<Instant>, BoxError> {
        let variant = self.variant;
        let check = |bytes: &[u8]| -> Result<(), BoxError> {
            match expected {
                Some(want) if want != bytes => Err(format!(
                    "{variant:?}: received {} bytes that differ from the {} sent",
                    bytes.len(),
                    want.len()
                )
                .into()),
                _ => Ok(()),
            }
        };
        let done = match self.variant {
            Variant::Socket => {
                let Some([len]) = self.header::<1>()? else {
                    return Ok(None);
                };
                let mut buf = vec![0u8; to_usize(len)?];
                self.stream.read_exact(&mut buf)?;
                let text = String::from_utf8(buf)?;
                let done = Instant::now();
                check(text.as_bytes())?;
                done
            }
            Variant::FreshPread | Variant::FreshMmapCopy | Variant::FreshMmapInPlace => {
                let Some([len, number]) = self.header::<2>()? else {
                    return Ok(None);
                };
                let len = to_usize(len)?;
                let file = self.fresh_fd(number)?;
                match self.variant {
                    Variant::FreshPread => {
                        let mut buf = vec![0u8; len];
                        file.read_exact_at(&mut buf, 0)?;
                        let text = String::from_utf8(buf)?;
                        let done = Instant::now();
                        check(text.as_bytes())?;
                        done
                    }
                    Variant::FreshMmapCopy => {
                        let text = String::from_utf8(Mapping::new(&file, len)?.bytes().to_vec())?;
                        let done = Instant::now();
                        check(text.as_bytes())?;
                        done
                    }
                    _ => {
                        let mapping = Mapping::new(&file, len)?;
                        let text = std::str::from_utf8(mapping.bytes())?;
                        let done = Instant::now();
                        check(black_box(text).as_bytes())?;
                        done
                    }
                }
            }
            Variant::ReusedPread | Variant::ReusedMapCopy | Variant::ReusedMapInPlace => {
                let Some([len]) = self.header::<1>()? else {
                    return Ok(None);
                };
                let len = to_usize(len)?;
                let reused = reused.ok_or("the memfd never arrived")?;
                match self.variant {
                    Variant::ReusedPread => {
                        let mut buf = vec![0u8; len];
                        reused.file.read_exact_at(&mut buf, 0)?;
                        let text = String::from_utf8(buf)?;
                        let done = Instant::now();
                        check(text.as_bytes())?;
                        done
                    }
                    Variant::ReusedMapCopy => {
                        let text = String::from_utf8(reused.mapped(len)?.to_vec())?;
                        let done = Instant::now();
                        check(text.as_bytes())?;
                        done
                    }
                    _ => {
                        let text = std::str::from_utf8(reused.mapped(len)?)?;
                        let done = Instant::now();
                        check(black_box(text).as_bytes())?;
                        done
                    }
                }
            }
        };
        Ok(Some(done))
    }
}

/// `len` from a header as a `usize`.
fn to_usize(len: u64) -> Result<usize, BoxError> {
    Ok(usize::try_from(len)?)
}

/// The receiver thread: takes the reused memfd once (when the variant has one), then receives
/// messages until the sender closes the socket, acknowledging each with the instant it held the
/// text. The first `WARM_UP` messages are compared with `payload`.
fn receiver_thread(
    mut receiver: Receiver,
    payload: &[u8],
    acks: mpsc::Sender<Instant>,
) -> Result<(), BoxError> {
    let reused = if receiver.variant.reused() {
        let file = File::from(receiver.fds.recv()?);
        let mapping = match receiver.variant {
            Variant::ReusedMapCopy | Variant::ReusedMapInPlace => {
                Some(Mapping::new(&file, payload.len())?)
            }
            _ => None,
        };
        Some(Reused { file, mapping })
    } else {
        None
    };
    let mut received = 0usize;
    loop {
        let expected = (received < WARM_UP).then_some(payload);
        let Some(done) = receiver.receive(reused.as_ref(), expected)? else {
            return Ok(());
        };
        received += 1;
        if acks.send(done).is_err() {
            return Ok(());
        }
    }
}

/// The sender's side of one cell: sends `WARM_UP` messages, then measures up to `iterations`
/// (or until `CELL_BUDGET` is spent); returns the measured durations, each from the sender's
/// first step to the instant the receiver acknowledged.
fn sender_thread(
    variant: Variant,
    mut stream: UnixStream,
    fds: mpsc::Sender<OwnedFd>,
    acks: mpsc::Receiver<Instant>,
    payload: &[u8],
    iterations: usize,
) -> Result<Vec<Duration>, BoxError> {
    let len = u64::try_from(payload.len())?.to_le_bytes();
    let reused = if variant.reused() {
        let file = File::from(memfd_create("ipc-bench-reused", MFdFlags::MFD_CLOEXEC)?);
        file.set_len(u64::try_from(payload.len())?)?;
        fds.send(OwnedFd::from(file.try_clone()?))?;
        Some(file)
    } else {
        None
    };
    let mut samples = Vec::with_capacity(iterations);
    let mut measuring_since = None;
    for sent in 0..WARM_UP + iterations {
        if sent == WARM_UP {
            measuring_since = Some(Instant::now());
        }
        if measuring_since.is_some_and(|since| since.elapsed() > CELL_BUDGET) {
            break;
        }
        let start = Instant::now();
        if variant == Variant::Socket {
            stream.write_all(&len)?;
            stream.write_all(payload)?;
        } else if variant.fresh() {
            let mut file = File::from(memfd_create("ipc-bench", MFdFlags::MFD_CLOEXEC)?);
            file.write_all(payload)?;
            let fd = OwnedFd::from(file);
            let number = u64::try_from(fd.as_raw_fd())?.to_le_bytes();
            fds.send(fd)?;
            let mut header = [0u8; 16];
            header[..8].copy_from_slice(&len);
            header[8..].copy_from_slice(&number);
            stream.write_all(&header)?;
        } else {
            let file = reused.as_ref().ok_or("no reused memfd")?;
            file.write_all_at(payload, 0)?;
            stream.write_all(&len)?;
        }
        let Ok(done) = acks.recv() else {
            return Err("the receiver stopped".into());
        };
        if sent >= WARM_UP {
            samples.push(done.saturating_duration_since(start));
        }
    }
    Ok(samples)
}

/// Runs one cell (a variant at a size) with a fresh socketpair and a fresh thread pair.
fn measure(variant: Variant, payload: &[u8], iterations: usize) -> Result<Vec<Duration>, BoxError> {
    let (send_end, receive_end) = UnixStream::pair()?;
    let (fd_tx, fd_rx) = mpsc::channel();
    let (ack_tx, ack_rx) = mpsc::channel();
    let receiver = Receiver {
        variant,
        stream: receive_end,
        fds: fd_rx,
    };
    std::thread::scope(|scope| {
        let receiving = scope.spawn(move || receiver_thread(receiver, payload, ack_tx));
        let sent = sender_thread(variant, send_end, fd_tx, ack_rx, payload, iterations);
        // The sender's socket end is dropped by now, so the receiver sees EOF and returns.
        let received = receiving
            .join()
            .map_err(|_| BoxError::from("the receiver thread panicked"))?;
        received.map_err(|e| format!("receiver ({variant:?}): {e}"))?;
        sent.map_err(|e| BoxError::from(format!("sender ({variant:?}): {e}")))
    })
}

/// `std::str::from_utf8` over the warm payload, `iterations` times (or `CELL_BUDGET`).
fn measure_utf8(payload: &[u8], iterations: usize) -> Result<Vec<Duration>, BoxError> {
    for _ in 0..WARM_UP {
        std::str::from_utf8(black_box(payload))?;
    }
    let since = Instant::now();
    let mut samples = Vec::with_capacity(iterations);
    while samples.len() < iterations && since.elapsed() <= CELL_BUDGET {
        let start = Instant::now();
        black_box(std::str::from_utf8(black_box(payload))?);
        samples.push(start.elapsed());
    }
    Ok(samples)
}

/// A JSON job input of exactly `size` bytes: `{"input":{"text":"..."}}` with pseudo-random
/// lowercase letters (no escapes), like the text our host parses.
fn payload(size: usize) -> Vec<u8> {
    const HEAD: &[u8] = br#"{"input":{"text":""#;
    const TAIL: &[u8] = br#""}}"#;
    let mut text = Vec::with_capacity(size);
    text.extend_from_slice(HEAD);
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    while text.len() < size - TAIL.len() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        text.push(b'a' + (state % 26) as u8);
    }
    text.extend_from_slice(TAIL);
    text
}

/// Median and p90 (nearest rank) of `samples`, which must not be empty.
fn percentiles(samples: &mut [Duration]) -> (Duration, Duration) {
    samples.sort_unstable();
    let rank = |p: usize| samples[(samples.len() * p).div_ceil(100).max(1) - 1];
    (rank(50), rank(90))
}

/// `size` in KiB or MiB.
fn size_label(size: usize) -> String {
    if size >= MIB {
        format!("{} MiB", size / MIB)
    } else {
        format!("{} KiB", size / KIB)
    }
}

/// The machine in one line: CPU model, cores, kernel.
fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, NonZeroUsize::get);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|release| release.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    format!("{}, {cores} cores, Linux {kernel}", common::cpu_model())
}

/// Measures every size and variant and prints the table.
fn run() -> Result<(), BoxError> {
    let started = Instant::now();
    println!("ipc-bench: one-way handoff of a JSON payload, sender thread -> receiver thread");
    println!("machine: {}", machine());
    println!(
        "stand-in: the memfd's fd goes through an in-process channel, its number through the \
         socket (not SCM_RIGHTS)"
    );
    println!(
        "timed: sender's first step -> receiver holds a UTF-8-checked String (or &str in place); \
         teardown not timed"
    );
    println!();
    println!(
        "{:<8} {:<46} {:>5} {:>11} {:>11} {:>7} {:>9}",
        "size", "variant", "n", "median µs", "p90 µs", "GB/s", "vs socket"
    );
    for (size, iterations) in SIZES {
        let payload = payload(size);
        let mut socket_median = None;
        let variants = Variant::ALL.iter().map(|&variant| Some(variant));
        // `None` is the reference row, after the variants.
        for variant in variants.chain([None]) {
            let (label, mut samples) = match variant {
                Some(variant) => (variant.label(), measure(variant, &payload, iterations)?),
                None => (
                    "(ref) from_utf8 alone, warm bytes",
                    measure_utf8(&payload, iterations)?,
                ),
            };
            if samples.is_empty() {
                return Err(format!("{label}: no sample within the budget").into());
            }
            let n = samples.len();
            let (median, p90) = percentiles(&mut samples);
            let socket = *socket_median.get_or_insert(median);
            println!(
                "{:<8} {:<46} {:>5} {:>11.1} {:>11.1} {:>7.2} {:>9.2}",
                size_label(size),
                label,
                n,
                median.as_secs_f64() * 1e6,
                p90.as_secs_f64() * 1e6,
                size as f64 / median.as_secs_f64() / 1e9,
                median.as_secs_f64() / socket.as_secs_f64(),
            );
        }
        println!();
    }
    println!(
        "vs socket: median / the socket's median at that size (< 1.00: faster than the socket); \
         total {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("ipc-bench failed: {message}");
            ExitCode::FAILURE
        }
    }
}
