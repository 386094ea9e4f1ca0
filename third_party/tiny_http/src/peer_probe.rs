//! Patched (see PATCHES.md): whether a request's client has closed its connection, asked
//! while the server is still working on the answer (and reads nothing from the socket).

use crate::connection::Connection;
use std::sync::Arc;

/// A duplicate of a connection's socket that can only be asked whether the peer has shut
/// down its side. Cloning shares the duplicate.
#[derive(Clone)]
pub struct PeerProbe {
    socket: Arc<Connection>,
}

impl PeerProbe {
    pub(crate) fn new(socket: Connection) -> PeerProbe {
        PeerProbe { socket: Arc::new(socket) }
    }

    /// True once the peer has closed or reset the TCP connection: the socket has left
    /// the ESTABLISHED state (CLOSE_WAIT after the peer's FIN, CLOSE after a reset).
    /// Read from the kernel's TCP_INFO, so bytes the peer sent stay unread and this
    /// server's own shutdown of its reading side (tiny_http's, after a request with
    /// `Connection: close`) does not count. Never blocks. Where it cannot tell (not TCP,
    /// not Linux), false.
    #[allow(unsafe_code)]
    pub fn closed(&self) -> bool {
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::io::AsRawFd;
            const TCP_ESTABLISHED: u8 = 1;
            // struct tcp_info begins with the u8 tcpi_state; the kernel copies at most
            // `len` bytes of it.
            let mut info = [0u8; 256];
            let mut len = info.len() as libc::socklen_t;
            // SAFETY: `info` is writable for `len` bytes, `len` is a valid socklen_t, and
            // the descriptor stays open while `self` lives.
            let rc = unsafe {
                libc::getsockopt(
                    self.socket.as_raw_fd(),
                    libc::IPPROTO_TCP,
                    libc::TCP_INFO,
                    info.as_mut_ptr().cast(),
                    &mut len,
                )
            };
            rc == 0 && len >= 1 && info[0] != TCP_ESTABLISHED
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = &self.socket;
            false
        }
    }
}
