//! The network's nftables rules, through Debian's `nft` tool: one table of
//! our own per network (`ip mvm-<network>`: masquerade for the subnet's
//! outbound traffic, a drop of traffic routed from one guest to another,
//! and one of traffic towards another network's bridge: every managed
//! bridge is in interface group [`BRIDGE_GROUP`](super::network::BRIDGE_GROUP)),
//! replaced atomically, deleted by `network down`.
//!
//! A host whose filter FORWARD policy is drop (Docker sets it through
//! iptables-nft) would drop the guests' forwarded traffic whatever our
//! table says: a drop in any base chain is final; an INPUT policy of drop
//! (ufw) would drop their DHCP and DNS. There, and only there, two accept
//! rules go into that `ip filter` chain, each carrying our comment so that
//! removal finds exactly them and nothing else.

use std::process::Command;

use super::network::NetworkSpec;
use super::{find_tool, run_tool};
use crate::Error;

/// The table of network `name`.
pub fn table_name(network: &str) -> String {
    format!("mvm-{network}")
}

/// The comment on the rules we add to a chain we do not own.
fn compat_comment(network: &str) -> String {
    format!("microvm-dev network {network}")
}

fn nft() -> Result<Command, Error> {
    let path = find_tool("nft").ok_or(Error::MissingTool {
        tool: "nft",
        package: "nftables",
    })?;
    Ok(Command::new(path))
}

/// Run `nft` with `args` and `stdin` as its script; its stderr on failure.
fn run(args: &[&str], stdin: Option<&str>) -> Result<String, Error> {
    let what = match stdin {
        Some(_) => format!("nft {} (ruleset of the network)", args.join(" ")),
        None => format!("nft {}", args.join(" ")),
    };
    run_tool(nft()?.args(args), what, stdin)
}

/// The whole table of `spec`, as an `nft -f` script that replaces any
/// older version in one transaction.
pub fn ruleset(spec: &NetworkSpec) -> String {
    let table = table_name(&spec.name);
    let bridge = &spec.bridge;
    let subnet = spec.subnet;
    let group = super::network::BRIDGE_GROUP;
    let mut isolation = format!(
        "\t\tiifname \"{bridge}\" oifname != \"{bridge}\" oifgroup {group} counter drop comment \"no traffic to other networks' guests\"\n"
    );
    if spec.isolate {
        isolation.push_str(&format!(
            "\t\tiifname \"{bridge}\" oifname \"{bridge}\" counter drop comment \"no traffic between guests through the host\"\n"
        ));
    }
    format!(
        "table ip {table}\n\
         delete table ip {table}\n\
         table ip {table} {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip saddr {subnet} ip daddr != {{ {subnet}, 224.0.0.0/4, 255.255.255.255 }} oifname != \"{bridge}\" counter masquerade comment \"outbound NAT\"\n\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         {isolation}\
         \t}}\n\
         }}\n"
    )
}

/// Create or replace the network's table, and make forwarding possible on
/// a host whose filter FORWARD policy drops.
pub fn apply(spec: &NetworkSpec) -> Result<(), Error> {
    run(&["-f", "-"], Some(&ruleset(spec)))?;
    allow_in_filter_table(spec, &ip_tables()?)
}

/// [`apply`] if the table is missing, and the FORWARD accept rules if a
/// drop policy appeared; cheap when all is in place (one `nft list`).
pub fn ensure(spec: &NetworkSpec) -> Result<(), Error> {
    let tables = ip_tables()?;
    if !has_table(&tables, &table_name(&spec.name)) {
        log::warn!("network {}: its nftables table was removed; putting it back", spec.name);
        run(&["-f", "-"], Some(&ruleset(spec)))?;
    }
    allow_in_filter_table(spec, &tables)
}

/// Whether the network's table exists.
pub fn table_exists(network: &str) -> Result<bool, Error> {
    Ok(has_table(&ip_tables()?, &table_name(network)))
}

/// `nft list tables ip`: one `table ip <name>` line each.
fn ip_tables() -> Result<String, Error> {
    run(&["list", "tables", "ip"], None)
}

fn has_table(listing: &str, name: &str) -> bool {
    listing
        .lines()
        .any(|l| l.trim().strip_prefix("table ip ") == Some(name))
}

/// Delete the network's table and our rules in `ip filter FORWARD`; what
/// is already gone is fine.
pub fn remove(network: &str) -> Result<(), Error> {
    if table_exists(network)? {
        run(&["delete", "table", "ip", &table_name(network)], None)?;
    }
    remove_compat_rules(network)
}

/// Chains of the iptables-nft filter table (what Docker and ufw use) that
/// may drop the guests' traffic, with the accept rules we put there when
/// their policy is drop: FORWARD for NAT, INPUT for DHCP and DNS to the
/// bridge.
const COMPAT_CHAINS: [&str; 2] = ["FORWARD", "INPUT"];

fn compat_rules(chain: &str, spec: &NetworkSpec) -> Vec<String> {
    let bridge = &spec.bridge;
    match chain {
        "FORWARD" => {
            let mut rules = vec![
                format!("iifname \"{bridge}\" oifname != \"{bridge}\" accept"),
                format!("oifname \"{bridge}\" iifname != \"{bridge}\" ct state established,related accept"),
            ];
            // With br_netfilter (Docker loads it) even frames bridged
            // between two ports pass this chain: a shared segment needs
            // them accepted.
            if !spec.isolate {
                rules.push(format!("iifname \"{bridge}\" oifname \"{bridge}\" accept"));
            }
            rules
        }
        _ => vec![
            format!("iifname \"{bridge}\" udp dport {{ 53, 67 }} accept"),
            format!("iifname \"{bridge}\" tcp dport 53 accept"),
        ],
    }
}

/// `nft -j -a list chain ip filter <chain>`, or None without that chain
/// (`tables`: [`ip_tables`]).
fn filter_listing(tables: &str, chain: &str) -> Result<Option<serde_json::Value>, Error> {
    if !has_table(tables, "filter") {
        return Ok(None);
    }
    let out = match run(&["-j", "-a", "list", "chain", "ip", "filter", chain], None) {
        Ok(out) => out,
        // The table exists without that chain.
        Err(Error::Command { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    serde_json::from_str(&out).map(Some).map_err(|e| Error::Command {
        what: format!("nft -j list chain ip filter {chain}"),
        output: format!("unreadable JSON: {e}"),
    })
}

/// Delete the rules of `network` from the filter table's chains.
fn remove_compat_rules(network: &str) -> Result<(), Error> {
    let comment = compat_comment(network);
    let tables = ip_tables()?;
    for chain in COMPAT_CHAINS {
        if let Some(listing) = filter_listing(&tables, chain)? {
            delete_rules(chain, &rules_with_comment(&listing, &comment))?;
        }
    }
    Ok(())
}

fn delete_rules(chain: &str, handles: &[u64]) -> Result<(), Error> {
    for handle in handles {
        run(
            &["delete", "rule", "ip", "filter", chain, "handle", &handle.to_string()],
            None,
        )?;
    }
    Ok(())
}

/// The handles of the rules in an `nft -j` listing whose comment is
/// `comment`.
fn rules_with_comment(listing: &serde_json::Value, comment: &str) -> Vec<u64> {
    let items = listing.get("nftables").and_then(|v| v.as_array());
    items
        .into_iter()
        .flatten()
        .filter_map(|item| item.get("rule"))
        .filter(|rule| rule.get("comment").and_then(|c| c.as_str()) == Some(comment))
        .filter_map(|rule| rule.get("handle").and_then(|h| h.as_u64()))
        .collect()
}

/// The policy of the chain in an `nft -j` listing ("accept" or "drop").
fn chain_policy(listing: &serde_json::Value) -> Option<String> {
    listing
        .get("nftables")?
        .as_array()?
        .iter()
        .filter_map(|item| item.get("chain"))
        .find_map(|chain| chain.get("policy").and_then(|p| p.as_str()).map(str::to_string))
}

/// Where the filter table's FORWARD or INPUT policy is drop (iptables-nft,
/// as Docker or ufw leave it), accept the guests' traffic there: a drop
/// in any base chain is final, whatever our own table says. Where the
/// policy accepts, rules of ours from an earlier drop policy go.
fn allow_in_filter_table(spec: &NetworkSpec, tables: &str) -> Result<(), Error> {
    let comment = compat_comment(&spec.name);
    for chain in COMPAT_CHAINS {
        let Some(listing) = filter_listing(tables, chain)? else {
            continue;
        };
        let ours = rules_with_comment(&listing, &comment);
        let rules = compat_rules(chain, spec);
        let wanted = chain_policy(&listing).as_deref() == Some("drop");
        if (wanted && ours.len() == rules.len()) || (!wanted && ours.is_empty()) {
            continue;
        }
        delete_rules(chain, &ours)?;
        if wanted {
            let script: String = rules
                .iter()
                .map(|r| format!("insert rule ip filter {chain} {r} comment \"{comment}\"\n"))
                .collect();
            run(&["-f", "-"], Some(&script))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(isolate: bool) -> NetworkSpec {
        NetworkSpec {
            name: "default".into(),
            bridge: "virbr-mvm".into(),
            subnet: "10.213.0.0/24".parse().unwrap(),
            isolate,
        }
    }

    #[test]
    fn ruleset_replaces_the_table_and_isolates_on_request() {
        let text = ruleset(&spec(true));
        assert!(text.starts_with("table ip mvm-default\ndelete table ip mvm-default\n"));
        assert!(text.contains("ip saddr 10.213.0.0/24"));
        assert!(text.contains("masquerade"));
        assert!(text.contains("iifname \"virbr-mvm\" oifname \"virbr-mvm\" counter drop"));
        let shared = ruleset(&spec(false));
        assert!(!shared.contains("oifname \"virbr-mvm\" counter drop"), "{shared}");
        assert!(
            shared.contains("oifname != \"virbr-mvm\" oifgroup 28022 counter drop"),
            "{shared}"
        );
    }

    #[test]
    fn shared_segments_accept_bridged_frames_under_a_drop_policy() {
        let bridged = "iifname \"virbr-mvm\" oifname \"virbr-mvm\" accept";
        assert!(compat_rules("FORWARD", &spec(false)).iter().any(|r| r == bridged));
        assert!(!compat_rules("FORWARD", &spec(true)).iter().any(|r| r == bridged));
        assert_eq!(compat_rules("INPUT", &spec(true)).len(), 2);
    }

    #[test]
    fn table_listing() {
        let listing = "table ip filter\ntable ip mvm-default\ntable ip nat\n";
        assert!(has_table(listing, "mvm-default") && has_table(listing, "filter"));
        assert!(!has_table(listing, "mvm-def") && !has_table(listing, "mvm-lab"));
    }

    #[test]
    fn finds_our_rules_and_the_policy_in_a_listing() {
        let listing: serde_json::Value = serde_json::from_str(
            r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
              {"chain": {"family": "ip", "table": "filter", "name": "FORWARD", "handle": 1, "type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}},
              {"rule": {"family": "ip", "table": "filter", "chain": "FORWARD", "handle": 7, "comment": "microvm-dev network default", "expr": []}},
              {"rule": {"family": "ip", "table": "filter", "chain": "FORWARD", "handle": 8, "expr": []}},
              {"rule": {"family": "ip", "table": "filter", "chain": "FORWARD", "handle": 9, "comment": "microvm-dev network lab", "expr": []}}]}"#,
        )
        .unwrap();
        assert_eq!(rules_with_comment(&listing, &compat_comment("default")), vec![7]);
        assert_eq!(chain_policy(&listing).as_deref(), Some("drop"));
        assert!(rules_with_comment(&serde_json::json!({}), "x").is_empty());
    }
}
