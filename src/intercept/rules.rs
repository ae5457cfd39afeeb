//! `breakwater init`: the rules that send a pod's outbound TCP to the
//! sidecar, set with the `iptables` and `ip6tables` binaries (in nft mode
//! on current distributions), as service meshes do.
//!
//! One chain of the `nat` table, `BREAKWATER_OUTPUT`, reached from
//! `OUTPUT` for TCP:
//!
//! | rule | why |
//! |---|---|
//! | `-m owner --uid-owner U -j RETURN` | the sidecar's own connections (its UID) go where they were going |
//! | `-o lo -j RETURN` | loopback: the agent's calls to the sidecar's own ports, and anything local |
//! | `-p tcp -m multiport --dports P,... -j RETURN` | ports left alone (a database's) |
//! | `-d CIDR -j RETURN` | addresses left alone |
//! | `-p tcp -j REDIRECT --to-ports R` | everything else, to the sidecar's outbound port |
//!
//! Setting them twice leaves one set (the chain is emptied and refilled,
//! the jump added once); `--cleanup` removes the jump and the chain and
//! leaves the table as it was; `--dry-run` prints the commands and runs
//! none. Inbound traffic is not touched.

use std::net::IpAddr;
use std::process::Command;

/// The chain the rules live in.
pub const CHAIN: &str = "BREAKWATER_OUTPUT";

/// Ports per `multiport` rule (the match's limit).
const PORTS_PER_RULE: usize = 15;

/// What to redirect, and what to leave alone.
#[derive(Debug, Clone, Default)]
pub struct Redirect {
    /// The sidecar's outbound port (its `proxy.listen`).
    pub port: u16,
    /// UIDs whose connections are left alone: the sidecar's.
    pub exclude_uids: Vec<u32>,
    /// Destination ports left alone.
    pub exclude_ports: Vec<u16>,
    /// Destination networks left alone.
    pub exclude_cidrs: Vec<Cidr>,
}

/// An address and a prefix length, such as `10.0.0.0/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The network's address.
    pub addr: IpAddr,
    /// Its prefix length.
    pub prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = text.split_once('/').unwrap_or((text, ""));
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{text:?} is not an address or a network such as 10.0.0.0/8"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if prefix.is_empty() {
            max
        } else {
            prefix
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?}: the prefix length must be 0 to {max}"))?
        };
        Ok(Self { addr, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// IPv4 (`iptables`) or IPv6 (`ip6tables`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `iptables`.
    V4,
    /// `ip6tables`.
    V6,
}

impl Family {
    /// The binary that sets its rules.
    pub fn binary(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }
}

fn args(text: &str) -> Vec<String> {
    text.split_whitespace().map(str::to_owned).collect()
}

/// The chain's rules for `family`, as `iptables` arguments.
pub fn chain_rules(redirect: &Redirect, family: Family) -> Vec<Vec<String>> {
    let append = |rule: String| args(&format!("-t nat -A {CHAIN} {rule}"));
    let mut rules = Vec::new();
    for uid in &redirect.exclude_uids {
        rules.push(append(format!("-m owner --uid-owner {uid} -j RETURN")));
    }
    rules.push(append("-o lo -j RETURN".to_owned()));
    for ports in redirect.exclude_ports.chunks(PORTS_PER_RULE) {
        let list: Vec<String> = ports.iter().map(u16::to_string).collect();
        rules.push(append(format!(
            "-p tcp -m multiport --dports {} -j RETURN",
            list.join(",")
        )));
    }
    for cidr in &redirect.exclude_cidrs {
        if cidr.addr.is_ipv4() == (family == Family::V4) {
            rules.push(append(format!("-d {cidr} -j RETURN")));
        }
    }
    rules.push(append(format!(
        "-p tcp -j REDIRECT --to-ports {}",
        redirect.port
    )));
    rules
}

/// The jump from `OUTPUT` to the chain (after `-t nat` and `-A`/`-C`/`-D`).
fn jump(verb: &str) -> Vec<String> {
    args(&format!("-t nat {verb} OUTPUT -p tcp -j {CHAIN}"))
}

/// Runs the rules' commands, or (with `dry_run`) prints them only.
pub trait Runner {
    /// Runs `binary args`; whether it succeeded, and what it printed on
    /// standard error.
    fn run(&mut self, binary: &str, args: &[String]) -> Result<bool, String>;
}

/// Runs the real binaries.
#[derive(Debug, Default)]
pub struct System;

impl Runner for System {
    fn run(&mut self, binary: &str, args: &[String]) -> Result<bool, String> {
        let out = Command::new(binary).args(args).output().map_err(|e| {
            format!("cannot run {binary}: {e} (install the iptables package, or use --dry-run)")
        })?;
        if !out.status.success() && !args.iter().any(|a| a == "-C" || a == "-S") {
            return Err(format!(
                "{binary} {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(out.status.success())
    }
}

/// What was done, a command a line, as a person would type it.
fn line(binary: &str, args: &[String]) -> String {
    format!("{binary} {}", args.join(" "))
}

/// Sets the rules for `family`; returns the commands that changed the
/// table, as run.
pub fn set(
    redirect: &Redirect,
    family: Family,
    runner: &mut impl Runner,
) -> Result<Vec<String>, String> {
    let binary = family.binary();
    let mut done = Vec::new();
    let mut change = |runner: &mut dyn Runner, args: Vec<String>| -> Result<(), String> {
        runner.run(binary, &args)?;
        done.push(line(binary, &args));
        Ok(())
    };
    let exists = runner.run(binary, &args(&format!("-t nat -S {CHAIN}")))?;
    let fresh = if exists { "-F" } else { "-N" };
    change(runner, args(&format!("-t nat {fresh} {CHAIN}")))?;
    for rule in chain_rules(redirect, family) {
        change(runner, rule)?;
    }
    if !runner.run(binary, &jump("-C"))? {
        change(runner, jump("-A"))?;
    }
    Ok(done)
}

/// Removes the jump and the chain for `family`; returns the commands run.
pub fn clean(family: Family, runner: &mut impl Runner) -> Result<Vec<String>, String> {
    let binary = family.binary();
    let mut done = Vec::new();
    // A jump added twice by hand is removed twice.
    while runner.run(binary, &jump("-C"))? {
        runner.run(binary, &jump("-D"))?;
        done.push(line(binary, &jump("-D")));
    }
    if runner.run(binary, &args(&format!("-t nat -S {CHAIN}")))? {
        for verb in ["-F", "-X"] {
            let command = args(&format!("-t nat {verb} {CHAIN}"));
            runner.run(binary, &command)?;
            done.push(line(binary, &command));
        }
    }
    Ok(done)
}

/// The commands `set` would run on a namespace without the rules.
pub fn plan(redirect: &Redirect, family: Family) -> Vec<String> {
    let binary = family.binary();
    std::iter::once(args(&format!("-t nat -N {CHAIN}")))
        .chain(chain_rules(redirect, family))
        .chain(std::iter::once(jump("-A")))
        .map(|a| line(binary, &a))
        .collect()
}

/// Whether this network namespace has IPv6 (an address on any
/// interface, `::1` included).
pub fn has_ipv6() -> bool {
    std::fs::read_to_string("/proc/net/if_inet6").is_ok_and(|t| !t.trim().is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redirect() -> Redirect {
        Redirect {
            port: 15001,
            exclude_uids: vec![1337],
            exclude_ports: (5000..5020).collect(),
            exclude_cidrs: vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()],
        }
    }

    #[test]
    fn the_plan_leaves_the_sidecar_loopback_and_exclusions_alone() {
        let plan = plan(&redirect(), Family::V4);
        assert_eq!(
            plan.first().unwrap(),
            "iptables -t nat -N BREAKWATER_OUTPUT"
        );
        assert_eq!(
            plan[1],
            "iptables -t nat -A BREAKWATER_OUTPUT -m owner --uid-owner 1337 -j RETURN"
        );
        assert_eq!(
            plan[2],
            "iptables -t nat -A BREAKWATER_OUTPUT -o lo -j RETURN"
        );
        assert!(plan[3].ends_with("--dports 5000,5001,5002,5003,5004,5005,5006,5007,5008,5009,5010,5011,5012,5013,5014 -j RETURN"));
        assert!(plan[4].ends_with("--dports 5015,5016,5017,5018,5019 -j RETURN"));
        assert_eq!(
            plan[5],
            "iptables -t nat -A BREAKWATER_OUTPUT -d 10.0.0.0/8 -j RETURN"
        );
        assert_eq!(
            plan[6],
            "iptables -t nat -A BREAKWATER_OUTPUT -p tcp -j REDIRECT --to-ports 15001"
        );
        assert_eq!(
            plan[7],
            "iptables -t nat -A OUTPUT -p tcp -j BREAKWATER_OUTPUT"
        );
        assert_eq!(plan.len(), 8);
        let v6 = plan_v6();
        assert!(v6.iter().any(|l| l.ends_with("-d fd00::/8 -j RETURN")));
        assert!(!v6.iter().any(|l| l.contains("10.0.0.0")));
    }

    fn plan_v6() -> Vec<String> {
        plan(&redirect(), Family::V6)
    }

    #[test]
    fn networks_are_read_with_their_prefix() {
        assert_eq!(
            "10.1.2.3".parse::<Cidr>().unwrap().to_string(),
            "10.1.2.3/32"
        );
        assert_eq!("::1".parse::<Cidr>().unwrap().to_string(), "::1/128");
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("ten/8".parse::<Cidr>().is_err());
    }
}
