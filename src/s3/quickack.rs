//! Prompt ACKs for responses, against the 40 ms stall of small GETs.
//!
//! A server that writes a response's headers and its body in two writes, with Nagle's
//! algorithm on (Garage does, and so do many HTTP servers), sends the body only once the
//! headers are acknowledged. Linux delays that acknowledgement: on a kept-alive connection, a
//! request sent soon after the last answer puts the socket in "pingpong" (interactive) mode,
//! where the ACK waits to ride on our next request or for the delayed-ACK timer, at least
//! 40 ms. So every small GET on a reused connection took 40 ms more than it needed.
//!
//! The fix is ours to make: once a response's headers are in, `TCP_QUICKACK` on its socket
//! leaves pingpong mode and sends the pending ACK at once, so the body follows at once.
//! Nothing changes on the server or the wire but the ACK's timing.
//!
//! reqwest does not hand out its sockets. The response carries the connection's local and
//! remote address (hyper's `HttpInfo`), so the socket is found by those among this process's
//! descriptors, once per connection, and remembered. Each use checks that the descriptor still
//! has those addresses: a descriptor closed and reused meanwhile is found again, never
//! touched as the old one. A connection through a SOCKS proxy carries no addresses and keeps
//! the kernel's default.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, RawFd};
use std::sync::Mutex;

/// The sockets of the connections seen so far, by their addresses.
#[derive(Debug, Default)]
pub(super) struct QuickAck {
    sockets: Mutex<HashMap<(SocketAddr, SocketAddr), RawFd>>,
}

/// How many connections are remembered before the closed ones are forgotten.
const REMEMBERED: usize = 256;

impl QuickAck {
    /// Acknowledges at once what the connection of `resp` has received.
    pub(super) fn ack(&self, resp: &reqwest::Response) {
        let Some(info) = resp
            .extensions()
            .get::<hyper_util::client::legacy::connect::HttpInfo>()
        else {
            return;
        };
        let addrs = (info.local_addr(), info.remote_addr());
        let known = self.sockets().get(&addrs).copied();
        let fd = match known.filter(|&fd| has_addrs(fd, addrs)) {
            Some(fd) => fd,
            None => match find_socket(addrs) {
                Some(fd) => {
                    let mut sockets = self.sockets();
                    if sockets.len() >= REMEMBERED {
                        sockets.retain(|&a, &mut fd| has_addrs(fd, a));
                    }
                    sockets.insert(addrs, fd);
                    fd
                }
                None => return,
            },
        };
        // SAFETY of the borrow: only socket options are read and set, which on a descriptor
        // closed meanwhile fail with EBADF, and on one reused by another socket switch that
        // socket's ACKs once, which is harmless.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let _ = socket2::SockRef::from(&fd).set_tcp_quickack(true);
    }

    fn sockets(&self) -> std::sync::MutexGuard<'_, HashMap<(SocketAddr, SocketAddr), RawFd>> {
        self.sockets.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Whether `fd` is a socket connected from `local` to `remote`.
fn has_addrs(fd: RawFd, (local, remote): (SocketAddr, SocketAddr)) -> bool {
    // SAFETY: see `ack`; getsockname and getpeername only read.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    let sock = socket2::SockRef::from(&fd);
    let addr = |a: std::io::Result<socket2::SockAddr>| a.ok().and_then(|a| a.as_socket());
    addr(sock.local_addr()) == Some(local) && addr(sock.peer_addr()) == Some(remote)
}

/// This process's descriptor of the socket connected from `addrs.0` to `addrs.1`.
fn find_socket(addrs: (SocketAddr, SocketAddr)) -> Option<RawFd> {
    std::fs::read_dir("/proc/self/fd")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<RawFd>().ok())
        .find(|&fd| has_addrs(fd, addrs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_socket_is_found_by_its_addresses_and_a_closed_one_is_not() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server, _) = listener.accept().unwrap();
        let addrs = (client.local_addr().unwrap(), client.peer_addr().unwrap());
        assert_eq!(find_socket(addrs), Some(client.as_raw_fd()));
        assert!(has_addrs(client.as_raw_fd(), addrs));
        let fd = client.as_raw_fd();
        drop(client);
        assert!(!has_addrs(fd, addrs));
        assert_eq!(find_socket(addrs), None);
    }
}
