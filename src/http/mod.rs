//! HTTP/1.1 on the TCP listener: the connection (`conn`), the one status table (`status`),
//! credentials and resume parameters (`credentials`), the client behind a trusted proxy
//! (`forwarded`), routing with its handlers (`routes`), and the site CA's certificate (`ca_cert`).
//! A request for `/ws/emergencias` leaves this layer as an `Upgrade` for `ws`; nothing here
//! imports `ws`.

pub mod assets;
pub mod ca_cert;
pub mod conn;
pub mod credentials;
pub mod forwarded;
pub mod routes;
pub mod status;
