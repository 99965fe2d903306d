//! Which container (and Kubernetes pod) a process runs in, from its cgroup path: the layouts
//! the kubelet (systemd and cgroupfs drivers), containerd, CRI-O and Docker create. Pure
//! parsing; the path is read by the resources collector. The path is untrusted only in that a
//! process can move itself into a cgroup it may write to; ids are validated (a UUID, 64 hex
//! digits), so labels stay bounded in size and charset whatever the path says.

use std::fmt;

/// A container: its runtime id and, under Kubernetes, its pod's UID. `Copy`, no allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContainerRef {
    /// The pod UID (a UUID), when the path is under `kubepods`.
    pub pod_uid: Option<u128>,
    /// The container id: 64 hex digits, as runtimes and kube-state-metrics print it.
    pub id: [u8; 32],
}

impl ContainerRef {
    /// The pod UID as Kubernetes prints it (`8-4-4-4-12` lowercase hex), or "" outside a pod.
    pub fn pod_uid_text(&self) -> String {
        self.pod_uid.map_or_else(String::new, |u| {
            let h = format!("{u:032x}");
            format!(
                "{}-{}-{}-{}-{}",
                &h[..8],
                &h[8..12],
                &h[12..16],
                &h[16..20],
                &h[20..]
            )
        })
    }
}

impl fmt::Display for ContainerRef {
    /// The container id in hex.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.id {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

fn container_id(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut id = [0u8; 32];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(id)
}

/// A pod UID as the cgroup path writes it: dashes (cgroupfs) or underscores (systemd).
fn pod_uid(text: &str) -> Option<u128> {
    let hex: String = text.chars().filter(|c| *c != '-' && *c != '_').collect();
    if hex.len() != 32 || text.len() != 36 {
        return None;
    }
    u128::from_str_radix(&hex, 16).ok()
}

/// The container id in one path component: `cri-containerd-ID.scope`, `crio-ID.scope`,
/// `docker-ID.scope`, `crio-conmon-…` excluded (the monitor, not the container), or a bare ID.
fn component_id(part: &str) -> Option<[u8; 32]> {
    let part = part.strip_suffix(".scope").unwrap_or(part);
    if part.starts_with("crio-conmon-") {
        return None;
    }
    let id = ["cri-containerd-", "crio-", "docker-", "containerd-"]
        .iter()
        .find_map(|p| part.strip_prefix(p))
        .unwrap_or(part);
    container_id(id)
}

/// The container of a cgroup path (a `/proc/PID/cgroup` path, with or without a `v1:`/`v2:`
/// tag), if it names one.
pub fn from_cgroup_path(path: &str) -> Option<ContainerRef> {
    let path = path
        .strip_prefix("v1:")
        .or_else(|| path.strip_prefix("v2:"))
        .unwrap_or(path);
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    // The innermost component that is a container id (nested cgroups inside a container, e.g.
    // systemd in a container, sit below it).
    let (at, id) = parts
        .iter()
        .enumerate()
        .rev()
        .find_map(|(i, p)| component_id(p).map(|id| (i, id)))?;
    let pod_uid = parts[..at]
        .iter()
        .rev()
        .find_map(|p| {
            // systemd driver: kubepods-burstable-pod<uid_with_underscores>.slice
            // cgroupfs driver: pod<uid-with-dashes>
            let p = p.strip_suffix(".slice").unwrap_or(p);
            let uid = p.rsplit_once("pod").map(|(_, u)| u)?;
            pod_uid(uid)
        })
        .filter(|_| parts.iter().any(|p| p.starts_with("kubepods")));
    Some(ContainerRef { pod_uid, id })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn kubelet_systemd_driver() {
        let path = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1b2c3d4e_0f1a_4b2c_8d3e_4f5a6b7c8d9e.slice/cri-containerd-{ID}.scope"
        );
        let c = from_cgroup_path(&path).unwrap();
        assert_eq!(c.to_string(), ID);
        assert_eq!(c.pod_uid_text(), "1b2c3d4e-0f1a-4b2c-8d3e-4f5a6b7c8d9e");
    }

    #[test]
    fn kubelet_cgroupfs_driver_and_guaranteed_pods() {
        let c = from_cgroup_path(&format!(
            "v1:/kubepods/pod1b2c3d4e-0f1a-4b2c-8d3e-4f5a6b7c8d9e/{ID}"
        ))
        .unwrap();
        assert_eq!(c.pod_uid_text(), "1b2c3d4e-0f1a-4b2c-8d3e-4f5a6b7c8d9e");
        let c = from_cgroup_path(&format!(
            "/kubepods/besteffort/pod1b2c3d4e-0f1a-4b2c-8d3e-4f5a6b7c8d9e/crio-{ID}.scope"
        ))
        .unwrap();
        assert_eq!(c.to_string(), ID);
    }

    #[test]
    fn docker_without_kubernetes() {
        let c = from_cgroup_path(&format!("/system.slice/docker-{ID}.scope")).unwrap();
        assert_eq!((c.pod_uid, c.to_string()), (None, ID.to_owned()));
        let c = from_cgroup_path(&format!("/docker/{ID}/init.scope")).unwrap();
        assert_eq!(c.to_string(), ID);
        assert_eq!(c.pod_uid_text(), "");
    }

    #[test]
    fn not_containers() {
        for path in [
            "/",
            "/user.slice/user-0.slice/session-1.scope",
            "/system.slice/ssh.service",
            "/kubepods/pod1b2c3d4e-0f1a-4b2c-8d3e-4f5a6b7c8d9e",
            &format!("/kubepods/pod1/crio-conmon-{ID}.scope"),
            &format!("/x/{}", &ID[..63]),
            &format!("/x/{}g", &ID[..63]),
        ] {
            assert_eq!(from_cgroup_path(path), None, "{path}");
        }
        // A malformed pod UID leaves the pod out, not the container.
        let c = from_cgroup_path(&format!("/kubepods/podnot-a-uid/{ID}")).unwrap();
        assert_eq!(c.pod_uid, None);
    }
}
