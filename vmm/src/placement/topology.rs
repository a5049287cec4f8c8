//! The host's NUMA topology as sysfs shows it: each node's CPUs
//! (`/sys/devices/system/node/nodeN/cpulist`), its free memory (`nodeN/meminfo`: `MemFree` and
//! `FilePages`, page cache the kernel can drop) and free hugepages, and the node of a PCI device
//! (`/sys/bus/pci/devices/BDF/numa_node`, -1 when the firmware does not say).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use rvmm_pci::Bdf;
use rvmm_vfio::sriov::PfSpec;

use super::cpulist::CpuList;
use super::{PlacementError, Result};
use crate::device::{DeviceSource, DeviceSpec};
use crate::memory::HugepageSize;

/// One host NUMA node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    /// The node number.
    pub id: u32,
    /// Its online CPUs.
    pub cpus: CpuList,
    /// Bytes it can give a new allocation: `MemFree` plus `FilePages` (page cache).
    pub free_bytes: u64,
    /// Free 2 MiB hugepages in its pool.
    pub free_2m: u64,
    /// Free 1 GiB hugepages in its pool.
    pub free_1g: u64,
}

impl NodeInfo {
    /// Free hugepages of `size` in this node's pool.
    pub fn free_hugepages(&self, size: HugepageSize) -> u64 {
        match size {
            HugepageSize::Size2M => self.free_2m,
            HugepageSize::Size1G => self.free_1g,
        }
    }
}

/// The host's NUMA nodes, in ascending order (empty on a kernel without NUMA support).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostTopology {
    /// The nodes.
    pub nodes: Vec<NodeInfo>,
}

impl HostTopology {
    /// The node numbered `id`.
    pub fn node(&self, id: u32) -> Option<&NodeInfo> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// Reads the topology under the sysfs root `sys` (`/sys` on a real host).
    pub fn read(sys: &Path) -> Result<Self> {
        let dir = sys.join("devices/system/node");
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => return Err(PlacementError::HostRead { path: dir, source }),
        };
        let mut nodes = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_prefix("node"))
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            nodes.push(read_node(&entry.path(), id)?);
        }
        nodes.sort_by_key(|n| n.id);
        Ok(HostTopology { nodes })
    }
}

/// Reads node `id` from its sysfs directory.
fn read_node(dir: &Path, id: u32) -> Result<NodeInfo> {
    let cpulist = dir.join("cpulist");
    let cpus = read_text(&cpulist)?
        .parse()
        .map_err(|_| PlacementError::HostParse {
            path: cpulist,
            field: "cpulist",
        })?;
    let meminfo = dir.join("meminfo");
    let free_bytes = node_free_bytes(&read_text(&meminfo)?).ok_or(PlacementError::HostParse {
        path: meminfo,
        field: "MemFree or FilePages",
    })?;
    let free_pages = |size: HugepageSize| {
        read_text(&dir.join(format!(
            "hugepages/hugepages-{}kB/free_hugepages",
            size.kib()
        )))
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
    };
    Ok(NodeInfo {
        id,
        cpus,
        free_bytes,
        free_2m: free_pages(HugepageSize::Size2M),
        free_1g: free_pages(HugepageSize::Size1G),
    })
}

/// A `Node N <name>: <n> kB` line of a node's `meminfo`, in bytes.
pub fn node_meminfo_field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        let mut words = key.split_whitespace();
        let (Some("Node"), Some(_), Some(field), None) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            return None;
        };
        if field != name {
            return None;
        }
        let kib = value.trim().strip_suffix("kB")?.trim_end();
        kib.parse::<u64>().ok()?.checked_mul(1024)
    })
}

/// What a node can give a new allocation: `MemFree` plus `FilePages`.
pub fn node_free_bytes(meminfo: &str) -> Option<u64> {
    node_meminfo_field(meminfo, "MemFree")?.checked_add(node_meminfo_field(meminfo, "FilePages")?)
}

/// The NUMA node of a passthrough device as asked for, from sysfs under `sys`: the device's own
/// node, or for a VF its PF's (a VF sits on its PF's node). `None` when sysfs says -1 (unknown)
/// or has no such file.
pub fn device_node(sys: &Path, spec: &DeviceSpec) -> Result<Option<u32>> {
    let path = match &spec.source {
        DeviceSource::Host(bdf) => pci_numa_path(sys, bdf),
        DeviceSource::Vf(request) => match &request.pf {
            PfSpec::Pci(bdf) => pci_numa_path(sys, bdf),
            PfSpec::Netdev(name) => sys.join("class/net").join(name).join("device/numa_node"),
        },
    };
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(PlacementError::HostRead { path, source }),
    };
    parse_numa_node(&text).ok_or(PlacementError::HostParse {
        path,
        field: "numa_node",
    })
}

/// `numa_node`'s text: a node number, or -1 (unknown) as `None`; `None` outside for bad text.
pub fn parse_numa_node(text: &str) -> Option<Option<u32>> {
    let value: i64 = text.trim().parse().ok()?;
    match value {
        -1 => Some(None),
        n => u32::try_from(n).ok().map(Some),
    }
}

fn pci_numa_path(sys: &Path, bdf: &Bdf) -> PathBuf {
    sys.join("bus/pci/devices")
        .join(bdf.to_string())
        .join("numa_node")
}

fn read_text(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|source| PlacementError::HostRead {
        path: path.to_owned(),
        source,
    })
}

/// The CPUs this process may run on (`sched_getaffinity`).
pub fn allowed_cpus() -> io::Result<CpuList> {
    let mut mask = vec![0 as libc::c_ulong; 128];
    let bytes = std::mem::size_of_val(mask.as_slice());
    // SAFETY: the kernel writes at most `bytes` bytes into `mask`, which holds that many.
    let ret = unsafe { libc::syscall(libc::SYS_sched_getaffinity, 0, bytes, mask.as_mut_ptr()) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(CpuList::from_mask(&mask))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE1_MEMINFO: &str = "Node 1 MemTotal:        1535980 kB\n\
                                 Node 1 MemFree:         1400000 kB\n\
                                 Node 1 MemUsed:          135980 kB\n\
                                 Node 1 FilePages:         20000 kB\n\
                                 Node 1 HugePages_Free:      0\n";

    fn fake_sys() -> tempfile_dir::Dir {
        let dir = tempfile_dir::Dir::new("topology");
        for (id, cpus, free_kib) in [(0, "0\n", 100), (1, "1\n", 200)] {
            let node = dir.path().join(format!("devices/system/node/node{id}"));
            fs::create_dir_all(node.join("hugepages/hugepages-2048kB")).unwrap();
            fs::write(node.join("cpulist"), cpus).unwrap();
            fs::write(
                node.join("meminfo"),
                format!("Node {id} MemFree: {free_kib} kB\nNode {id} FilePages: 10 kB\n"),
            )
            .unwrap();
            fs::write(
                node.join("hugepages/hugepages-2048kB/free_hugepages"),
                "7\n",
            )
            .unwrap();
        }
        fs::write(dir.path().join("devices/system/node/possible"), "0-1\n").unwrap();
        let dev = dir.path().join("bus/pci/devices/0000:10:00.0");
        fs::create_dir_all(&dev).unwrap();
        fs::write(dev.join("numa_node"), "1\n").unwrap();
        dir
    }

    /// A scratch directory removed on drop.
    mod tempfile_dir {
        use std::path::{Path, PathBuf};

        pub struct Dir(PathBuf);

        impl Dir {
            pub fn new(name: &str) -> Self {
                let path = std::env::temp_dir().join(format!(
                    "rvmm-{name}-{}-{:?}",
                    std::process::id(),
                    std::thread::current().id()
                ));
                let _ = std::fs::remove_dir_all(&path);
                std::fs::create_dir_all(&path).unwrap();
                Dir(path)
            }

            pub fn path(&self) -> &Path {
                &self.0
            }
        }

        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn node_meminfo_fields_are_read_in_bytes() {
        assert_eq!(
            node_meminfo_field(NODE1_MEMINFO, "MemFree"),
            Some(1_400_000 * 1024)
        );
        assert_eq!(node_meminfo_field(NODE1_MEMINFO, "Missing"), None);
    }

    #[test]
    fn free_bytes_count_page_cache() {
        assert_eq!(node_free_bytes(NODE1_MEMINFO), Some(1_420_000 * 1024));
    }

    #[test]
    fn free_bytes_need_both_fields() {
        assert_eq!(node_free_bytes("Node 0 MemFree: 4 kB\n"), None);
    }

    #[test]
    fn numa_node_minus_one_is_unknown() {
        assert_eq!(parse_numa_node("-1\n"), Some(None));
        assert_eq!(parse_numa_node("1\n"), Some(Some(1)));
        assert_eq!(parse_numa_node("-2"), None);
        assert_eq!(parse_numa_node("x"), None);
    }

    #[test]
    fn topology_is_read_from_sysfs() {
        let sys = fake_sys();

        let topology = HostTopology::read(sys.path()).unwrap();

        assert_eq!(topology.nodes.len(), 2);
        let node1 = topology.node(1).unwrap();
        assert_eq!(node1.cpus, CpuList::from_ids([1]));
        assert_eq!(node1.free_bytes, 210 * 1024);
        assert_eq!(node1.free_2m, 7);
        assert_eq!(node1.free_1g, 0);
    }

    #[test]
    fn host_without_numa_has_no_nodes() {
        let sys = tempfile_dir::Dir::new("no-numa");

        assert_eq!(
            HostTopology::read(sys.path()).unwrap(),
            HostTopology::default()
        );
    }

    #[test]
    fn device_node_is_read_and_missing_is_unknown() {
        let sys = fake_sys();
        let known: DeviceSpec = "0000:10:00.0".parse().unwrap();
        let absent: DeviceSpec = "0000:11:00.0".parse().unwrap();

        assert_eq!(device_node(sys.path(), &known).unwrap(), Some(1));
        assert_eq!(device_node(sys.path(), &absent).unwrap(), None);
    }

    #[test]
    fn this_process_may_run_somewhere() {
        assert!(!allowed_cpus().unwrap().is_empty());
    }
}
