//! The frames of the runner channel (see the [parent module](super) for who sends what, and in
//! which order), and reading and writing them on a blocking stream.
//!
//! A frame is a fixed 24-byte header and a body:
//!
//! ```text
//! offset 0   u64 LE  body length in bytes
//! offset 8   u8      kind (Kind)
//! offset 9   u8      flags (per kind: a job outcome and recycle bit, a log level)
//! offset 10  [u8; 6] zero
//! offset 16  u64 LE  call: the job a frame is about (0 for the runner as a whole)
//! offset 24          body
//! ```
//!
//! Bodies are raw bytes, not an encoding of them: a job's JSON text goes into the channel as it
//! is (written with one vectored write straight from the job's own buffers) and comes out as one
//! buffer the handler's strings point into, so a 20 MiB input is copied by the kernel and by no
//! one else. Small structured bodies (the descriptor, the facts
//! after `init`, a load error, a failure with its traceback) are JSON.
//!
//! The framing is written here rather than taken from a codec crate because both ends are
//! blocking threads and the point is to avoid assembling a frame in a buffer of its own. A job's
//! task on the host's async runtime writes its frames without waiting when the socket has room
//! ([`try_write_frame`]), which is the usual case, and waits only for the rest.

use std::io::{IoSlice, Read, Write};

/// The size of a frame header.
const HEADER_LEN: usize = 24;

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    // Host to runner.
    /// Run `init`; body: the handler configuration (JSON text).
    Init = 1,
    /// Run a job; body: see [`job_body`].
    Job = 2,
    /// Cancel the job `call`; no body.
    Cancel = 3,
    /// Finish the running jobs, run `teardown` and exit; no body.
    Shutdown = 4,
    // Runner to host.
    /// The library loaded; body: the handler's descriptor facts (`HandlerInfo`, JSON).
    Loaded = 10,
    /// The library could not be loaded, or `init` failed; body: the `LoadError` (JSON).
    Failed = 11,
    /// `init` succeeded; body: the handler's facts after `init` (`HandlerInfo`, JSON): the
    /// descriptor's, with the streaming flag and concurrency `init` reported (ABI 1.1
    /// `set_features`), which are what the host serves with.
    Ready = 12,
    /// A log line of the handler's; flags: the `wh_log_level`; body: the text.
    Log = 13,
    /// A stream chunk of the job `call`; body: JSON text.
    Chunk = 14,
    /// A progress report of the job `call`; body: JSON text.
    Progress = 15,
    /// The job `call` ended; flags: [`Outcome`] | [`RECYCLE`]; body: the output's JSON text, or
    /// for a failure the `Failure` (JSON: `error_type`, `message`, and `traceback` when the
    /// handler gave one, ABI 1.1), or nothing for a finished stream. A failed `init`'s `Failed`
    /// frame carries its traceback the same way, inside the `LoadError`.
    Done = 16,
    /// `teardown` ran; the runner exits next. No body.
    TornDown = 17,
}

impl Kind {
    fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            1 => Self::Init,
            2 => Self::Job,
            3 => Self::Cancel,
            4 => Self::Shutdown,
            10 => Self::Loaded,
            11 => Self::Failed,
            12 => Self::Ready,
            13 => Self::Log,
            14 => Self::Chunk,
            15 => Self::Progress,
            16 => Self::Done,
            17 => Self::TornDown,
            _ => return None,
        })
    }
}

/// How a job ended, in a [`Kind::Done`] frame's flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Outcome {
    /// The body is the output.
    Output = 0,
    /// A streaming job finished; no body.
    Streamed = 1,
    /// The body is the failure.
    Failed = 2,
}

/// The flag bit of a [`Kind::Done`] frame saying the handler asked to be recycled.
pub(crate) const RECYCLE: u8 = 0x10;

impl Outcome {
    /// The outcome in a Done frame's flags.
    pub(crate) fn from_flags(flags: u8) -> Option<Self> {
        match flags & 0x0f {
            0 => Some(Self::Output),
            1 => Some(Self::Streamed),
            2 => Some(Self::Failed),
            _ => None,
        }
    }
}

/// One frame read from the channel.
#[derive(Debug)]
pub(crate) struct Frame {
    pub(crate) kind: Kind,
    pub(crate) flags: u8,
    pub(crate) call: u64,
    pub(crate) body: Vec<u8>,
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    /// The other end closed the channel between frames.
    #[error("the channel was closed")]
    Closed,
    /// Reading failed, or the channel closed inside a frame.
    #[error("reading the runner channel failed: {0}")]
    Io(#[from] std::io::Error),
    /// The frame breaks the protocol.
    #[error("the runner channel carried an invalid frame: {0}")]
    Invalid(String),
}

/// Reads the next frame; a body over `max_body` bytes is refused before anything is allocated.
pub(crate) fn read_frame(reader: &mut impl Read, max_body: u64) -> Result<Frame, ReadError> {
    read_frame_led(reader, max_body, |_, _| (b"", 0))
}

/// As [`read_frame`], with the body read into a buffer that begins with what `lead` gives for
/// the frame's kind and flags (the start of the job-done body a job's output goes into, so the
/// output needs no copy of its own), and has room for as many bytes more as it says (the end of
/// that body, so finishing it does not reallocate); the frame's body is then the lead and the
/// body.
pub(crate) fn read_frame_led(
    reader: &mut impl Read,
    max_body: u64,
    lead: impl FnOnce(Kind, u8) -> (&'static [u8], usize),
) -> Result<Frame, ReadError> {
    let mut header = [0_u8; HEADER_LEN];
    // Distinguish a clean close (no byte of a new frame) from one inside a frame.
    let mut filled = 0;
    while filled < HEADER_LEN {
        match reader.read(&mut header[filled..]) {
            Ok(0) if filled == 0 => return Err(ReadError::Closed),
            Ok(0) => return Err(ReadError::Io(std::io::ErrorKind::UnexpectedEof.into())),
            Ok(read) => filled += read,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error.into()),
        }
    }
    let length = u64::from_le_bytes(header[0..8].try_into().expect("8 bytes"));
    let kind = Kind::from_byte(header[8])
        .ok_or_else(|| ReadError::Invalid(format!("unknown kind {}", header[8])))?;
    let flags = header[9];
    let call = u64::from_le_bytes(header[16..24].try_into().expect("8 bytes"));
    if length > max_body {
        return Err(ReadError::Invalid(format!(
            "a {kind:?} body of {length} bytes, over the limit of {max_body}"
        )));
    }
    // Read into spare capacity rather than a zeroed buffer: a 20 MiB body is written once.
    let (lead, room) = lead(kind, flags);
    let mut body = crate::buffers::take(
        usize::try_from(length).expect("checked against the limit") + lead.len() + room,
    );
    body.extend_from_slice(lead);
    reader.take(length).read_to_end(&mut body)?;
    if (body.len() - lead.len()) as u64 != length {
        return Err(ReadError::Io(std::io::ErrorKind::UnexpectedEof.into()));
    }
    Ok(Frame {
        kind,
        flags,
        call,
        body,
    })
}

/// Writes one frame whose body is `parts`, in order, with vectored writes (no copy of the
/// parts into a buffer). The caller holds the writer for the whole frame.
pub(crate) fn write_frame(
    writer: &mut impl Write,
    kind: Kind,
    flags: u8,
    call: u64,
    parts: &[&[u8]],
) -> std::io::Result<()> {
    write_rest_of_frame(writer, kind, flags, call, parts, 0)
}

/// Writes what is left of a frame [`try_write_frame`] began: its first `written` bytes are
/// already on the socket.
pub(crate) fn write_rest_of_frame(
    writer: &mut impl Write,
    kind: Kind,
    flags: u8,
    call: u64,
    parts: &[&[u8]],
    written: usize,
) -> std::io::Result<()> {
    let header = header(kind, flags, call, parts);
    let mut slices = slices(&header, parts);
    let mut remaining = &mut slices[..];
    IoSlice::advance_slices(&mut remaining, written);
    while !remaining.is_empty() {
        match writer.write_vectored(remaining) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(written) => IoSlice::advance_slices(&mut remaining, written),
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    writer.flush()
}

/// Writes as much of a frame as `socket` takes without waiting (one `sendmsg` with
/// `MSG_DONTWAIT`, the socket itself staying blocking for everyone else), and says how many
/// bytes that was: [`frame_len`] when the whole frame went, fewer when the socket's buffer is
/// full (then [`write_rest_of_frame`] finishes it, before any other frame is written).
pub(crate) fn try_write_frame(
    socket: &std::os::unix::net::UnixStream,
    kind: Kind,
    flags: u8,
    call: u64,
    parts: &[&[u8]],
) -> std::io::Result<usize> {
    use nix::sys::socket::{sendmsg, MsgFlags};
    use std::os::fd::AsRawFd;
    let header = header(kind, flags, call, parts);
    let slices = slices(&header, parts);
    loop {
        let sent = sendmsg::<()>(
            socket.as_raw_fd(),
            &slices,
            &[],
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            None,
        );
        return match sent {
            Ok(written) => Ok(written),
            Err(nix::errno::Errno::EAGAIN) => Ok(0),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(errno) => Err(errno.into()),
        };
    }
}

/// How many bytes the frame whose body is `parts` takes on the channel.
pub(crate) fn frame_len(parts: &[&[u8]]) -> usize {
    HEADER_LEN + parts.iter().map(|part| part.len()).sum::<usize>()
}

fn header(kind: Kind, flags: u8, call: u64, parts: &[&[u8]]) -> [u8; HEADER_LEN] {
    let length = frame_len(parts) - HEADER_LEN;
    let mut header = [0_u8; HEADER_LEN];
    header[0..8].copy_from_slice(&(length as u64).to_le_bytes());
    header[8] = kind as u8;
    header[9] = flags;
    header[16..24].copy_from_slice(&call.to_le_bytes());
    header
}

fn slices<'a>(header: &'a [u8; HEADER_LEN], parts: &[&'a [u8]]) -> Vec<IoSlice<'a>> {
    let mut slices = Vec::with_capacity(parts.len() + 1);
    slices.push(IoSlice::new(header));
    slices.extend(parts.iter().map(|part| IoSlice::new(part)));
    slices
}

/// The body of a [`Kind::Job`] frame, as parts for [`write_frame`]: four u64 LE numbers (the
/// lengths of the id and of the job JSON, NULs included, and where the input starts in the job
/// JSON and its length), then the id and the job JSON, each followed by a NUL. The input is not
/// sent twice: the runner finds it in the job JSON.
pub(crate) fn job_body<'a>(
    numbers: &'a mut [u8; 32],
    id_with_nul: &'a [u8],
    job_json_with_nul: &'a [u8],
    input: std::ops::Range<usize>,
) -> [&'a [u8]; 3] {
    let values = [
        id_with_nul.len(),
        job_json_with_nul.len(),
        input.start,
        input.len(),
    ];
    for (slot, value) in numbers.chunks_exact_mut(8).zip(values) {
        slot.copy_from_slice(&(value as u64).to_le_bytes());
    }
    [numbers, id_with_nul, job_json_with_nul]
}

/// A [`Kind::Job`] body taken apart: the id and the job JSON, each with its NUL, and the
/// input's range in the job JSON (checked to lie inside it, before its NUL).
pub(crate) struct JobParts<'a> {
    pub(crate) id: &'a [u8],
    pub(crate) job_json: &'a [u8],
    pub(crate) input: &'a [u8],
}

/// Splits a [`Kind::Job`] body; `None` if it is malformed.
pub(crate) fn split_job_body(body: &[u8]) -> Option<JobParts<'_>> {
    let number = |index: usize| -> Option<usize> {
        let bytes = body.get(index * 8..index * 8 + 8)?;
        usize::try_from(u64::from_le_bytes(bytes.try_into().ok()?)).ok()
    };
    let (id_len, job_len) = (number(0)?, number(1)?);
    let (input_start, input_len) = (number(2)?, number(3)?);
    let strings = body.get(32..)?;
    let (id, rest) = strings.split_at_checked(id_len)?;
    let job_json = rest.get(..job_len)?;
    let input_end = input_start.checked_add(input_len)?;
    if input_end >= job_json.len() || rest.len() != job_len {
        return None;
    }
    Some(JobParts {
        id,
        job_json,
        input: &job_json[input_start..input_end],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame written in parts reads back whole, and a closed channel between frames reads as
    /// `Closed`, inside one as an I/O error.
    #[test]
    fn frames_round_trip() {
        let mut wire = Vec::new();
        write_frame(&mut wire, Kind::Chunk, 3, 42, &[b"{\"a\":", b"1}"]).unwrap();
        write_frame(&mut wire, Kind::Ready, 0, 0, &[]).unwrap();
        let mut reader = &wire[..];
        let frame = read_frame(&mut reader, 100).unwrap();
        assert_eq!(
            (frame.kind, frame.flags, frame.call, frame.body.as_slice()),
            (Kind::Chunk, 3, 42, &b"{\"a\":1}"[..])
        );
        let frame = read_frame(&mut reader, 100).unwrap();
        assert_eq!((frame.kind, frame.body.len()), (Kind::Ready, 0));
        assert!(matches!(
            read_frame(&mut reader, 100),
            Err(ReadError::Closed)
        ));
        let mut cut = &wire[..10];
        assert!(matches!(read_frame(&mut cut, 100), Err(ReadError::Io(_))));
    }

    /// A body over the limit is refused from its header, before it is read.
    #[test]
    fn oversize_bodies_are_refused() {
        let mut wire = Vec::new();
        write_frame(&mut wire, Kind::Done, 0, 1, &[&[b'x'; 64]]).unwrap();
        assert!(matches!(
            read_frame(&mut &wire[..], 63),
            Err(ReadError::Invalid(_))
        ));
    }

    /// A job body splits back into the three strings, each with its NUL.
    #[test]
    fn job_bodies_split_into_their_parts() {
        let job = b"{\"id\":\"id-1\",\"input\":{\"x\":1}}\0";
        let mut numbers = [0; 32];
        let parts = job_body(&mut numbers, b"id-1\0", job, 21..28);
        let body: Vec<u8> = parts.concat();
        let split = split_job_body(&body).unwrap();
        assert_eq!(split.id, b"id-1\0");
        assert_eq!(split.input, b"{\"x\":1}");
        assert_eq!(split.job_json, job);
        assert!(split_job_body(&body[..20]).is_none());
        assert!(split_job_body(&body[..body.len() - 1]).is_none());
        // An input range past the job JSON (or over its NUL) is refused.
        for input in [21..30, 30..40, usize::MAX - 1..usize::MAX] {
            let mut numbers = [0; 32];
            let body = job_body(&mut numbers, b"id-1\0", job, input.clone()).concat();
            assert!(split_job_body(&body).is_none(), "{input:?}");
        }
    }
}
