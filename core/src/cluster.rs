//! A cluster's name and numeric ID: what makes identities and endpoints unique across a mesh.

use std::fmt;
use std::str::FromStr;

/// Largest cluster ID: the ID occupies 9 high bits of a security identity.
pub const MAX_CLUSTER_ID: u16 = 511;
/// Longest cluster name; it is embedded in certificate names and flow records.
pub const MAX_CLUSTER_NAME_LEN: usize = 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClusterError {
    #[error("cluster ID {0} is out of range: use a number from 1 to {MAX_CLUSTER_ID}, unique within the mesh")]
    IdOutOfRange(u64),
    #[error("cluster ID {0:?} is not a number: use a number from 1 to {MAX_CLUSTER_ID}")]
    IdNotANumber(String),
    #[error("cluster name {name:?} is invalid: {reason}")]
    InvalidName { name: String, reason: &'static str },
}

/// A cluster ID in 1..=511. Zero is reserved for "this cluster" in identities of a lone cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClusterId(u16);

impl ClusterId {
    pub fn new(id: u64) -> Result<Self, ClusterError> {
        match u16::try_from(id) {
            Ok(id) if (1..=MAX_CLUSTER_ID).contains(&id) => Ok(Self(id)),
            _ => Err(ClusterError::IdOutOfRange(id)),
        }
    }

    pub fn get(self) -> u16 {
        self.0
    }
}

impl FromStr for ClusterId {
    type Err = ClusterError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let id: u64 = s
            .trim()
            .parse()
            .map_err(|_| ClusterError::IdNotANumber(s.to_owned()))?;
        Self::new(id)
    }
}

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A cluster name: a DNS label of at most 32 characters (lowercase alphanumerics and '-',
/// starting and ending with an alphanumeric), because it appears in certificate names.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClusterName(String);

/// The same rule as [`ClusterName`], for schemas that must state it as a regular expression.
pub const CLUSTER_NAME_PATTERN: &str = "^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$";

impl ClusterName {
    pub fn new(name: impl Into<String>) -> Result<Self, ClusterError> {
        let name = name.into();
        let invalid = |reason| ClusterError::InvalidName {
            name: name.clone(),
            reason,
        };
        if name.is_empty() {
            return Err(invalid("it is empty"));
        }
        if name.len() > MAX_CLUSTER_NAME_LEN {
            return Err(invalid("it is longer than 32 characters"));
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(invalid(
                "use only lowercase letters, digits and '-' (a DNS label)",
            ));
        }
        if name.starts_with('-') || name.ends_with('-') {
            return Err(invalid("it must start and end with a letter or digit"));
        }
        Ok(Self(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for ClusterName {
    type Err = ClusterError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The cluster every daemon belongs to, given the same way to each of them.
#[derive(Clone, Debug, clap::Args)]
pub struct ClusterArgs {
    /// This cluster's name in the mesh (a DNS label of at most 32 characters).
    #[arg(long, env = "WEFT_CLUSTER_NAME", default_value = "default")]
    pub cluster_name: ClusterName,
    /// This cluster's ID in the mesh (1-511), unique among meshed clusters.
    #[arg(long, env = "WEFT_CLUSTER_ID", default_value = "1")]
    pub cluster_id: ClusterId,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_ids_outside_1_to_511_are_refused() {
        assert_eq!(ClusterId::new(0), Err(ClusterError::IdOutOfRange(0)));
        assert_eq!(ClusterId::new(512), Err(ClusterError::IdOutOfRange(512)));
        assert_eq!(
            ClusterId::new(70_000),
            Err(ClusterError::IdOutOfRange(70_000))
        );
        assert_eq!(ClusterId::new(1).map(ClusterId::get), Ok(1));
        assert_eq!("511".parse::<ClusterId>().map(ClusterId::get), Ok(511));
        assert!(matches!(
            "eu-1".parse::<ClusterId>(),
            Err(ClusterError::IdNotANumber(_))
        ));
    }

    #[test]
    fn cluster_names_are_short_dns_labels() {
        assert!(ClusterName::new("gpu-east-1").is_ok());
        assert!(ClusterName::new("a").is_ok());
        assert!(ClusterName::new("a".repeat(32)).is_ok());
        for bad in ["", "-east", "east-", "East", "gpu_east", &"a".repeat(33)] {
            assert!(ClusterName::new(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
