//! Two network namespaces of the test's own, joined by a veth pair: the
//! agent's (`10.77.N.1`), where the sidecar runs and `breakwater init`
//! sets its rules, and the upstreams' (`10.77.N.2`). Traffic never leaves
//! them. Needs root, `ip` and `iptables`; without them [`Pair::new`] says
//! so and returns `None` (a failure under `BREAKWATER_REQUIRE_PEERS`).

use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};

/// The pair; both namespaces are deleted on drop.
pub struct Pair {
    /// The agent's namespace.
    pub agent: String,
    /// The upstreams' namespace.
    pub upstream: String,
    /// The agent's address.
    pub agent_ip: String,
    /// The upstreams' address.
    pub upstream_ip: String,
    /// The upstreams' IPv6 address, where the namespaces have IPv6.
    pub upstream_ip6: Option<String>,
}

fn ok(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn must(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Each pair of one test process gets its own subnet.
static NEXT: AtomicU8 = AtomicU8::new(0);

impl Pair {
    /// Creates the pair, or says why it cannot and returns `None`.
    pub fn new() -> Option<Self> {
        let why = if !ok("unshare", &["-n", "true"]) {
            Some("cannot create network namespaces (not root, or no CAP_SYS_ADMIN)")
        } else if !ok("iptables", &["--version"]) {
            Some("no iptables (apt-get install iptables, or run .ci/run)")
        } else if !ok("ip", &["-V"]) {
            Some("no ip (iproute2)")
        } else {
            None
        };
        if let Some(why) = why {
            assert!(
                std::env::var_os("BREAKWATER_REQUIRE_PEERS").is_none(),
                "{why}"
            );
            eprintln!("SKIPPED: {why}");
            return None;
        }
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let tag = format!("bw{}x{n}", std::process::id());
        let pair = Self {
            agent: format!("{tag}a"),
            upstream: format!("{tag}u"),
            agent_ip: format!("10.77.{n}.1"),
            upstream_ip: format!("10.77.{n}.2"),
            upstream_ip6: None,
        };
        must("ip", &["netns", "add", &pair.agent]);
        must("ip", &["netns", "add", &pair.upstream]);
        let (a, u) = (format!("{tag}va"), format!("{tag}vu"));
        must(
            "ip",
            &["link", "add", &a, "type", "veth", "peer", "name", &u],
        );
        must("ip", &["link", "set", &a, "netns", &pair.agent]);
        must("ip", &["link", "set", &u, "netns", &pair.upstream]);
        for (ns, dev, ip) in [
            (&pair.agent, &a, &pair.agent_ip),
            (&pair.upstream, &u, &pair.upstream_ip),
        ] {
            must(
                "ip",
                &["-n", ns, "addr", "add", &format!("{ip}/24"), "dev", dev],
            );
            must("ip", &["-n", ns, "link", "set", dev, "up"]);
            must("ip", &["-n", ns, "link", "set", "lo", "up"]);
        }
        // IPv6 too, without duplicate address detection (the address is
        // usable at once), where the kernel has it.
        let v6 = [
            (pair.agent.clone(), &a, format!("fd77:{n}::1/64")),
            (pair.upstream.clone(), &u, format!("fd77:{n}::2/64")),
        ];
        let mut pair = pair;
        if v6
            .iter()
            .all(|(ns, dev, ip)| ok("ip", &["-n", ns, "addr", "add", ip, "dev", dev, "nodad"]))
        {
            pair.upstream_ip6 = Some(format!("fd77:{n}::2"));
        }
        Some(pair)
    }

    /// Gives the agent's namespace its own `/etc/hosts` (`ip netns exec`
    /// mounts `/etc/netns/<name>/hosts` over it).
    pub fn agent_hosts(&self, text: &str) {
        let dir = format!("/etc/netns/{}", self.agent);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(format!("{dir}/hosts"), text).unwrap();
    }

    /// A command run in namespace `ns`.
    pub fn command(ns: &str, program: &str) -> tokio::process::Command {
        let mut command = tokio::process::Command::new("ip");
        command
            .args(["netns", "exec", ns, program])
            .kill_on_drop(true);
        command
    }

    /// Runs `program args` in `ns` to its end.
    pub async fn run(ns: &str, program: &str, args: &[&str]) -> Output {
        Self::command(ns, program)
            .args(args)
            .output()
            .await
            .unwrap()
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        // Deleting a namespace ends its veth end, and the pair with it.
        for ns in [&self.agent, &self.upstream] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
            let _ = std::fs::remove_dir_all(format!("/etc/netns/{ns}"));
        }
    }
}
