//! A loopback TCP proxy that can be taken down: while down it drops every open connection and
//! resets new ones at once, as a server that crashed or a network that broke would. For outage
//! tests against servers that cannot be restarted without losing their data (moto keeps its
//! objects in memory).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// A running proxy from `127.0.0.1:<port>` to a target on this machine.
pub struct TcpProxy {
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    down: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl TcpProxy {
    /// Forwards `127.0.0.1:<new port>` to `127.0.0.1:<target_port>`.
    pub fn start(target_port: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let target = SocketAddr::from(([127, 0, 0, 1], target_port));
        let (down, stop) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (d, s, o) = (down.clone(), stop.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                if d.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(target) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                if let (Ok(c), Ok(sv)) = (client.try_clone(), server.try_clone()) {
                    o.lock().unwrap_or_else(|e| e.into_inner()).extend([c, sv]);
                }
                pump(&client, &server);
                pump(&server, &client);
            }
        });
        Self { port, down, stop, open }
    }

    /// `http://127.0.0.1:<port>`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Takes the proxy down (every connection dropped, new ones reset) or brings it back.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
        if down {
            for c in self.open.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
    }
}

/// Copies `from` to `to` on a thread until either side closes.
fn pump(from: &TcpStream, to: &TcpStream) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else { return };
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.set_down(true);
        // Wakes the accept loop so it sees the stop flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}
