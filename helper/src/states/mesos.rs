//! `linux.mesos.master`, `linux.mesos.slave`: **retired**. Both states fail, every
//! round, with a message that says why and what to use instead; they change nothing.
//!
//! Decision (issue 9). What the original did cannot be done on a current system:
//! - it installed Mesosphere's `mesosphere`/`mesos` packages (and Marathon) from the apt
//!   repository `deb http://repos.mesosphere.io/ubuntu trusty main`, which no longer
//!   exists, with Oracle Java 8 from a webupd8 PPA script that is gone too;
//! - Debian (12) ships no `mesos`, `mesosphere` or `marathon` package (only ZooKeeper,
//!   `zookeeperd`, and Go bindings), and Apache Mesos itself moved to the Apache Attic
//!   in 2021: there is no maintained package to implement it against;
//! - the slave side also needed `lxc-docker` (Docker's 2015 package) and the
//!   `haproxy-marathon-bridge` script shipped with the original agent, and read the
//!   availability zone from the EC2 metadata service, which the helper (no network
//!   code) cannot reach.
//!
//! Writing configuration for services that cannot be installed would only make a
//! recipe look as if it worked. What remains possible is named in the message: ZooKeeper
//! from Debian's `zookeeperd` (`linux.apt.package` + `linux.file` for `zoo.cfg`/`myid` +
//! `linux.service`), or running the workload with a maintained scheduler (Kubernetes,
//! Nomad) or as plain containers with `linux.docker.running`.

use opsagent_proto::catalogue::{LinuxMesosMaster, LinuxMesosSlave};
use opsagent_proto::request::Outcome;

/// Why the Mesos modules are not carried out; the same text for both, after the module.
pub const RETIRED: &str = "is retired and does nothing: it installed Mesos and Marathon from \
    Mesosphere's apt repository (repos.mesosphere.io, Ubuntu trusty) and Java 8 from a webupd8 PPA, \
    both gone; Debian ships no mesos or marathon package and Apache Mesos was moved to the Apache Attic \
    (2021). Alternatives: ZooKeeper from Debian's zookeeperd (linux.apt.package, linux.file, \
    linux.service), or run the workload with a maintained scheduler (Kubernetes, Nomad) or as \
    containers with linux.docker.running";

pub fn master(_p: &LinuxMesosMaster) -> Outcome {
    Outcome::failed(format!("linux.mesos.master {RETIRED}"))
}

pub fn slave(_p: &LinuxMesosSlave) -> Outcome {
    Outcome::failed(format!("linux.mesos.slave {RETIRED}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::states::testutil::params;
    use opsagent_proto::catalogue::ModuleParams;
    use serde_json::json;

    #[test]
    fn both_fail_with_the_retired_reason_and_change_nothing() {
        let ModuleParams::LinuxMesosMaster(m) = params(
            "linux.mesos.master",
            json!({"cluster_name": "c", "master_ip": "10.0.0.1", "masters_addresses": [{"key": "10.0.0.1"}], "server_id": "1"}),
        ) else {
            panic!()
        };
        let out = master(&m);
        assert!(!out.result && out.changes.is_empty());
        assert!(out.comment.starts_with("linux.mesos.master is retired"), "{}", out.comment);
        assert!(out.comment.contains("repos.mesosphere.io") && out.comment.contains("Alternatives"));
        let ModuleParams::LinuxMesosSlave(s) = params(
            "linux.mesos.slave",
            json!({"attributes": [{"key": "rack", "value": "a"}], "masters_addresses": [{"key": "10.0.0.1"}], "slave_ip": "10.0.0.2"}),
        ) else {
            panic!()
        };
        assert!(slave(&s).comment.starts_with("linux.mesos.slave is retired"));
    }
}
