//! Transparent interception: the agent calls its upstreams as it always
//! did, and its connections reach the sidecar.
//!
//! | room | what it holds |
//! |---|---|
//! | [`rules`] | `breakwater init`: the `iptables` rules that redirect outbound TCP to the sidecar |
//! | [`outbound`] | the outbound port's look at a redirected connection: served with an upstream's policy, or relayed where it was going |

pub mod outbound;
pub mod rules;

use rules::{Family, Redirect, Runner};

/// Whether to set IPv6 rules too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ipv6 {
    /// When the namespace has IPv6.
    #[default]
    Auto,
    /// Always (fails where `ip6tables` cannot).
    On,
    /// Never.
    Off,
}

/// What `breakwater init` does.
#[derive(Debug, Clone, Default)]
pub struct InitOptions {
    /// The rules.
    pub redirect: Redirect,
    /// Print the commands, run none.
    pub dry_run: bool,
    /// Remove the rules instead.
    pub cleanup: bool,
    /// Whether to set IPv6 rules too.
    pub ipv6: Ipv6,
}

/// Sets (or removes, or plans) the rules; returns the commands, one a
/// line, as run (or as they would run).
pub fn init(options: &InitOptions, runner: &mut impl Runner) -> Result<Vec<String>, String> {
    if !options.cleanup {
        if options.redirect.port == 0 {
            return Err("--redirect-port must be a port, 1 to 65535".into());
        }
        if options.redirect.exclude_uids.is_empty() {
            return Err(
                "--exclude-uid is needed: without the sidecar's UID left alone, its own \
                 connections would come back to it"
                    .into(),
            );
        }
    }
    let v6 = match options.ipv6 {
        Ipv6::On => true,
        Ipv6::Off => false,
        Ipv6::Auto => rules::has_ipv6(),
    };
    let families = std::iter::once(Family::V4).chain(v6.then_some(Family::V6));
    let mut lines = Vec::new();
    for family in families {
        lines.extend(match (options.dry_run, options.cleanup) {
            (true, false) => rules::plan(&options.redirect, family),
            (true, true) => vec![format!(
                "{} -t nat -D OUTPUT -p tcp -j {1}; -F {1}; -X {1}",
                family.binary(),
                rules::CHAIN
            )],
            (false, false) => rules::set(&options.redirect, family, runner)?,
            (false, true) => rules::clean(family, runner)?,
        });
    }
    Ok(lines)
}
