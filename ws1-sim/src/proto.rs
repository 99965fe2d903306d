//! The services' wire format and the client side of a call.
//!
//! A frame is a u32 (little endian) length of what follows, a kind byte and a body. A request is
//! one frame written with one `write` call and its reply one frame, so on each connection the
//! agent sees exactly what it counts as a request: the client writes, then reads; the server
//! reads, then writes. Nothing is pipelined and no side speaks first.

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd as _,
    time::Duration,
};

use crate::stats::{Side, Stats};

/// Bound on a frame's length: a corrupt length cannot make a reader allocate gigabytes.
const MAX_FRAME: usize = 1 << 20;

/// Writes one frame with a single write: the kind, then `body_len` bytes, the first of which
/// is `op` (the operation a user asks agent-ops for), the rest filler.
pub fn write_frame(
    s: &mut TcpStream,
    kind: u8,
    op: u8,
    body_len: usize,
    buf: &mut Vec<u8>,
) -> io::Result<()> {
    buf.clear();
    buf.extend_from_slice(&((body_len as u32 + 1).to_le_bytes()));
    buf.push(kind);
    buf.resize(5 + body_len, 0x5a);
    if body_len > 0 {
        buf[5] = op;
    }
    s.write_all(buf)
}

/// Reads one frame into `buf` (its body); `None` on a clean end of stream before a frame.
pub fn read_frame(s: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<Option<u8>> {
    let mut hdr = [0u8; 5];
    let mut got = 0;
    while got < hdr.len() {
        match s.read(&mut hdr[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad frame length",
        ));
    }
    buf.resize(len - 1, 0);
    s.read_exact(buf)?;
    Ok(Some(hdr[4]))
}

/// Connects to loopback `port` (no Nagle delay: every request is one small write).
pub fn connect(port: u16) -> io::Result<TcpStream> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    Ok(s)
}

/// Closes `s` with a reset instead of a FIN (SO_LINGER with a zero timeout), as a crashing
/// or overloaded server does.
pub fn abort(s: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket descriptor and a pointer to a linger struct of the size given.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(s);
}

/// A client's connection to one upstream port: pooled (kept between calls) unless `churn`.
pub struct Upstream {
    pub port: u16,
    conn: Option<TcpStream>,
    buf: Vec<u8>,
}

/// Why a call failed.
#[derive(Debug)]
pub enum CallError {
    Refused,
    Reset,
    Other(#[allow(dead_code)] io::Error),
}

impl Upstream {
    pub fn new(port: u16) -> Upstream {
        Upstream {
            port,
            conn: None,
            buf: Vec::new(),
        }
    }

    /// One request/response exchange, counted in `stats` under (client, port). With `churn`
    /// the connection is opened for this call and closed after it.
    pub fn call(
        &mut self,
        stats: &Stats,
        kind: u8,
        op: u8,
        body_len: usize,
        churn: bool,
        reply: &mut Vec<u8>,
    ) -> Result<u8, CallError> {
        if self.conn.is_none() {
            match connect(self.port) {
                Ok(s) => {
                    stats.add(Side::Client, self.port, |c| c.connects += 1);
                    self.conn = Some(s);
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    stats.add(Side::Client, self.port, |c| c.refused += 1);
                    return Err(CallError::Refused);
                }
                Err(e) => return Err(CallError::Other(e)),
            }
        }
        let Some(conn) = self.conn.as_mut() else {
            return Err(CallError::Other(io::ErrorKind::NotConnected.into()));
        };
        let result = write_frame(conn, kind, op, body_len, &mut self.buf)
            .and_then(|()| read_frame(conn, reply));
        match result {
            Ok(Some(status)) => {
                stats.add(Side::Client, self.port, |c| c.requests += 1);
                if churn {
                    self.conn = None;
                }
                Ok(status)
            }
            Ok(None) => {
                self.conn = None;
                Err(CallError::Other(io::ErrorKind::UnexpectedEof.into()))
            }
            Err(e) => {
                self.conn = None;
                if e.kind() == io::ErrorKind::ConnectionReset {
                    stats.add(Side::Client, self.port, |c| c.resets += 1);
                    Err(CallError::Reset)
                } else {
                    Err(CallError::Other(e))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_over_loopback() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = Vec::new();
            let mut out = Vec::new();
            while let Some(kind) = read_frame(&mut s, &mut buf).unwrap() {
                write_frame(&mut s, kind + 1, 0, buf.len() * 2, &mut out).unwrap();
            }
        });
        let stats = Stats::default();
        let mut up = Upstream::new(port);
        let mut reply = Vec::new();
        assert_eq!(up.call(&stats, 7, 0, 10, false, &mut reply).unwrap(), 8);
        assert_eq!(reply.len(), 20);
        assert_eq!(up.call(&stats, 1, 0, 0, false, &mut reply).unwrap(), 2);
        drop(up);
        server.join().unwrap();
        let snap = stats.snapshot();
        let c = snap[&(Side::Client, port)];
        assert_eq!((c.requests, c.connects), (2, 1));
    }
}
