//! Who may use the control socket: peers are identified by SO_PEERCRED
//! when they connect and checked against an [`AuthPolicy`].

use std::io;

/// Allowed users and groups. The daemon's usual policy is root plus the
/// configured groups ([`AuthPolicy::root_and_groups`]); tests build their
/// own, including one that refuses everybody.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthPolicy {
    /// Peers with one of these uids are allowed.
    pub uids: Vec<u32>,
    /// Peers with one of these as primary or supplementary gid are allowed.
    pub gids: Vec<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("uid {uid} (gid {gid}) is neither an allowed user nor in an allowed group")]
    Denied { uid: u32, gid: u32 },
    #[error("cannot read the peer's credentials")]
    NoCredentials(#[source] io::Error),
}

/// A connected peer, as the kernel reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

impl AuthPolicy {
    pub fn root_and_groups(gids: Vec<u32>) -> AuthPolicy {
        AuthPolicy {
            uids: vec![0],
            gids,
        }
    }

    /// Refuses everybody, root included.
    pub fn deny_all() -> AuthPolicy {
        AuthPolicy::default()
    }

    /// Checks a peer; reads its supplementary groups from
    /// `/proc/<pid>/status` only when neither its uid nor its primary gid
    /// decides.
    pub fn check(&self, peer: &Peer) -> Result<(), AuthError> {
        self.check_with(peer, |pid| supplementary_groups(pid, peer.uid))
    }

    fn check_with(
        &self,
        peer: &Peer,
        groups_of: impl FnOnce(i32) -> io::Result<Vec<u32>>,
    ) -> Result<(), AuthError> {
        if self.uids.contains(&peer.uid) || self.gids.contains(&peer.gid) {
            return Ok(());
        }
        let denied = AuthError::Denied {
            uid: peer.uid,
            gid: peer.gid,
        };
        let Some(pid) = peer.pid.filter(|_| !self.gids.is_empty()) else {
            return Err(denied);
        };
        // The peer could exit and its pid be reused between accept and this
        // read: `supplementary_groups` refuses a process with another uid.
        match groups_of(pid) {
            Ok(groups) if groups.iter().any(|g| self.gids.contains(g)) => Ok(()),
            Ok(_) => Err(denied),
            Err(e) => {
                log::debug!("control: cannot read groups of pid {pid}: {e}");
                Err(denied)
            }
        }
    }
}

/// The `Groups:` of `/proc/<pid>/status`, if that process still has the
/// uid we were told (a reused pid would not).
fn supplementary_groups(pid: i32, uid: u32) -> io::Result<Vec<u32>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    if real_uid(&status) != Some(uid) {
        return Err(io::Error::other(format!(
            "pid {pid} no longer has uid {uid}"
        )));
    }
    Ok(parse_groups(&status))
}

fn real_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|u| u.split_whitespace().next())
        .and_then(|u| u.parse().ok())
}

fn parse_groups(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32) -> Peer {
        Peer {
            uid,
            gid,
            pid: Some(1234),
        }
    }

    #[test]
    fn parses_groups_line() {
        let s = "Name:\tbash\nUid:\t1000\t1000\t1000\t1000\nGroups:\t4 24 27 1000 \nNgid:\t0\n";
        assert_eq!(parse_groups(s), vec![4, 24, 27, 1000]);
        assert_eq!(real_uid(s), Some(1000));
        assert_eq!(parse_groups("Groups:\t\n"), Vec::<u32>::new());
        assert_eq!(parse_groups("Name: x\n"), Vec::<u32>::new());
    }

    #[test]
    fn policy() {
        let p = AuthPolicy::root_and_groups(vec![990]);
        let none = |_| Ok(vec![]);
        assert!(p.check_with(&peer(0, 0), none).is_ok());
        assert!(p.check_with(&peer(1000, 990), none).is_ok());
        assert!(p.check_with(&peer(1000, 1000), none).is_err());
        assert!(p
            .check_with(&peer(1000, 1000), |_| Ok(vec![27, 990]))
            .is_ok());
        assert!(p
            .check_with(&peer(1000, 1000), |_| Err(io::ErrorKind::NotFound.into()))
            .is_err());
        let deny = AuthPolicy::deny_all();
        assert!(deny.check_with(&peer(0, 0), |_| Ok(vec![0])).is_err());
    }
}
