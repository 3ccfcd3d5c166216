//! PROXY protocol version 2 headers, sent to the target before the consumer's bytes.
//!
//! In: where the consumer came from, the address it reached, and who the TLS peer proved to
//! be. Out: the binary header (HAProxy's `proxy-protocol.txt`, section 2.2), so the target sees
//! the real consumer and not the ambassador. Over `legate/1` the source is the consumer's own
//! address, passed on by the client ambassador in OPEN.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2, command PROXY.
const V2_PROXY: u8 = 0x21;
const AF_UNSPEC: u8 = 0x00;
const TCP_V4: u8 = 0x11;
const TCP_V6: u8 = 0x21;

/// TLV types.
const PP2_TYPE_SSL: u8 = 0x20;
const PP2_SUBTYPE_SSL_VERSION: u8 = 0x21;
const PP2_SUBTYPE_SSL_CN: u8 = 0x22;
/// The first type of the range left for applications: legate puts the peer identity here
/// (a SPIFFE ID or `CN=...`).
pub const PP2_TYPE_LEGATE_IDENTITY: u8 = 0xE0;

const PP2_CLIENT_SSL: u8 = 0x01;
const PP2_CLIENT_CERT_CONN: u8 = 0x02;
const PP2_CLIENT_CERT_SESS: u8 = 0x04;

/// What the header says.
#[derive(Debug, Clone, Default)]
pub struct Header {
    pub source: Option<SocketAddr>,
    pub destination: Option<SocketAddr>,
    /// The TLS version, e.g. "TLSv1.3"; `None` when the peer did not use TLS.
    pub tls_version: Option<String>,
    /// The peer certificate's common name, when it has one.
    pub common_name: Option<String>,
    /// The peer's identity as legate logs it.
    pub identity: Option<String>,
}

impl Header {
    /// The header bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        let family = match (self.source, self.destination) {
            (Some(SocketAddr::V4(s)), Some(SocketAddr::V4(d))) => {
                body.extend_from_slice(&s.ip().octets());
                body.extend_from_slice(&d.ip().octets());
                body.extend_from_slice(&s.port().to_be_bytes());
                body.extend_from_slice(&d.port().to_be_bytes());
                TCP_V4
            }
            (Some(s), Some(d)) => {
                body.extend_from_slice(&v6(s.ip()).octets());
                body.extend_from_slice(&v6(d.ip()).octets());
                body.extend_from_slice(&s.port().to_be_bytes());
                body.extend_from_slice(&d.port().to_be_bytes());
                TCP_V6
            }
            // A consumer on a UNIX socket has no address to pass on; the TLVs still say who.
            _ => AF_UNSPEC,
        };
        if let Some(version) = &self.tls_version {
            let mut ssl = Vec::new();
            let mut client = PP2_CLIENT_SSL;
            if self.common_name.is_some() || self.identity.is_some() {
                client |= PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS;
            }
            ssl.push(client);
            // verify: 0 means the client certificate was verified.
            ssl.extend_from_slice(&0u32.to_be_bytes());
            tlv(&mut ssl, PP2_SUBTYPE_SSL_VERSION, version.as_bytes());
            if let Some(cn) = &self.common_name {
                tlv(&mut ssl, PP2_SUBTYPE_SSL_CN, cn.as_bytes());
            }
            tlv(&mut body, PP2_TYPE_SSL, &ssl);
        }
        if let Some(id) = &self.identity {
            tlv(&mut body, PP2_TYPE_LEGATE_IDENTITY, id.as_bytes());
        }
        let mut out = Vec::with_capacity(16 + body.len());
        out.extend_from_slice(&SIGNATURE);
        out.push(V2_PROXY);
        out.push(family);
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

fn tlv(out: &mut Vec<u8>, kind: u8, value: &[u8]) {
    // Values here are names and versions; cut rather than overflow the 16-bit length.
    let value = &value[..value.len().min(u16::MAX as usize - 64)];
    out.push(kind);
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(value);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_with_identity() {
        let h = Header {
            source: Some("10.0.0.1:5000".parse().unwrap()),
            destination: Some("10.0.0.2:6379".parse().unwrap()),
            tls_version: Some("TLSv1.3".into()),
            common_name: Some("app".into()),
            identity: Some("spiffe://td/app".into()),
        };
        let b = h.encode();
        assert_eq!(&b[..12], &SIGNATURE);
        assert_eq!((b[12], b[13]), (0x21, 0x11));
        let len = u16::from_be_bytes([b[14], b[15]]) as usize;
        assert_eq!(b.len(), 16 + len);
        assert_eq!(&b[16..20], &[10, 0, 0, 1]);
        assert_eq!(&b[20..24], &[10, 0, 0, 2]);
        assert_eq!(u16::from_be_bytes([b[24], b[25]]), 5000);
        assert_eq!(u16::from_be_bytes([b[26], b[27]]), 6379);
        assert_eq!(b[28], PP2_TYPE_SSL);
        let tail = String::from_utf8_lossy(&b[28..]);
        assert!(tail.contains("TLSv1.3") && tail.contains("app"));
        assert!(tail.ends_with("spiffe://td/app"));
    }

    #[test]
    fn mixed_families_become_ipv6_and_unknown_becomes_unspec() {
        let h = Header {
            source: Some("10.0.0.1:1".parse().unwrap()),
            destination: Some("[::1]:2".parse().unwrap()),
            ..Header::default()
        };
        let b = h.encode();
        assert_eq!(b[13], TCP_V6);
        assert_eq!(u16::from_be_bytes([b[14], b[15]]), 36);
        let unix = Header::default().encode();
        assert_eq!((unix[13], unix.len()), (AF_UNSPEC, 16));
    }
}
