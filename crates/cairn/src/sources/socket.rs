//! `socket_text_stream`: cairn connects to a TCP server and reads newline-terminated lines (as
//! Spark's `socketTextStream` does), reconnecting with backoff, into a receiver's write-ahead log.

use super::receiver::ReceiverHandle;
use std::io::Read;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Lines handed to the receiver at once, at most.
const CHUNK: usize = 1000;

/// Reads lines from `addr` into `handle` on a thread of its own until the job stops.
pub(crate) fn spawn_reader(handle: ReceiverHandle, addr: String) -> std::io::Result<()> {
    std::thread::Builder::new().name(format!("cairn-recv-{}", handle.name())).spawn(move || {
        let mut backoff = Duration::from_millis(100);
        let mut disconnects = 0u64;
        while !handle.is_stopped() {
            match connect(&addr) {
                Ok(stream) => {
                    tracing::info!("receiver {}: connected to {addr}", handle.name());
                    backoff = Duration::from_millis(100);
                    let why = read_lines(&handle, stream);
                    if handle.is_stopped() {
                        break;
                    }
                    disconnects += 1;
                    tracing::warn!(
                        "receiver {}: disconnected from {addr} ({why}; {disconnects} disconnect(s) so far); reconnecting",
                        handle.name()
                    );
                }
                Err(e) => {
                    tracing::warn!("receiver {}: cannot connect to {addr}: {e}; retrying in {backoff:?}", handle.name());
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    })?;
    Ok(())
}

fn connect(addr: &str) -> std::io::Result<TcpStream> {
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "the address resolves to nothing");
    for a in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&a, Duration::from_secs(2)) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Reads until the connection ends or the job stops; says why it ended.
fn read_lines(handle: &ReceiverHandle, mut stream: TcpStream) -> String {
    // Short reads keep the stop flag and the chunk's age checked.
    if let Err(e) = stream.set_read_timeout(Some(Duration::from_millis(100))) {
        return format!("cannot set a read timeout: {e}");
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut partial: Vec<u8> = Vec::new();
    let mut lines: Vec<Vec<u8>> = Vec::new();
    let mut since = Instant::now();
    loop {
        if handle.is_stopped() {
            return "the job stopped".into();
        }
        let ended = match stream.read(&mut buf) {
            Ok(0) => Some("the server closed the connection".to_string()),
            Ok(n) => {
                for part in buf[..n].split_inclusive(|b| *b == b'\n') {
                    partial.extend_from_slice(part);
                    if partial.last() == Some(&b'\n') {
                        partial.pop();
                        if partial.last() == Some(&b'\r') {
                            partial.pop();
                        }
                        lines.push(std::mem::take(&mut partial));
                    }
                }
                None
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                None
            }
            Err(e) => Some(format!("read failed: {e}")),
        };
        if ended.is_some() && !partial.is_empty() {
            // A last line the server ended without a newline is a line; after an error the
            // fragment is not known to be whole, and is dropped.
            if ended.as_deref() == Some("the server closed the connection") {
                lines.push(std::mem::take(&mut partial));
            } else {
                tracing::warn!(
                    "receiver {}: dropped an unterminated fragment of {} bytes",
                    handle.name(),
                    partial.len()
                );
            }
        }
        if !lines.is_empty()
            && (ended.is_some() || lines.len() >= CHUNK || since.elapsed() >= Duration::from_millis(50))
        {
            // The socket is not read while the buffer is full: the server slows down (TCP).
            let chunk = std::mem::take(&mut lines);
            loop {
                match handle.push_waiting(chunk.clone(), Duration::from_secs(1)) {
                    Ok(_) => break,
                    Err(super::receiver::Refused::Full(_) | super::receiver::Refused::RateLimited(_)) => {
                        continue
                    }
                    Err(super::receiver::Refused::Stopped) => return "the job stopped".into(),
                }
            }
            since = Instant::now();
        }
        if let Some(why) = ended {
            return why;
        }
    }
}
