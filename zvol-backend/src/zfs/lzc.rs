//! [`LzcZfs`]: the control path through libzfs_core, loaded at run time with `dlopen`.
//!
//! The crate builds and runs without ZFS installed: the libraries are looked up when a provisioner is
//! made. The sonames are those of OpenZFS 2.1 as Debian bookworm ships it (`zfsutils-linux`
//! 2.1.11): `libzfs_core.so.3` (package `libzfs4linux`) and `libnvpair.so.3` (package
//! `libnvpair3linux`). The prototypes below are those of OpenZFS `include/libzfs_core.h` and
//! `include/sys/nvpair.h`; `boolean_t` is an `int`-sized enum and `enum lzc_dataset_type` has
//! `LZC_DATSET_TYPE_ZVOL` = 3.
//!
//! ```text
//! int  libzfs_core_init(void);                      void libzfs_core_fini(void);
//! int  lzc_create(const char *, enum lzc_dataset_type, nvlist_t *props, uint8_t *wkey, uint_t wkeylen);
//! int  lzc_snapshot(nvlist_t *snaps, nvlist_t *props, nvlist_t **errlist);
//! int  lzc_clone(const char *fsname, const char *origin, nvlist_t *props);
//! int  lzc_destroy(const char *fsname);
//! int  lzc_destroy_snaps(nvlist_t *snaps, boolean_t defer, nvlist_t **errlist);
//! boolean_t lzc_exists(const char *dataset);
//! nvlist_t *fnvlist_alloc(void);                    void fnvlist_free(nvlist_t *);
//! void fnvlist_add_boolean(nvlist_t *, const char *);
//! void fnvlist_add_uint64(nvlist_t *, const char *, uint64_t);
//! void fnvlist_add_string(nvlist_t *, const char *, const char *);
//! nvpair_t *nvlist_next_nvpair(nvlist_t *, const nvpair_t *);
//! const char *nvpair_name(const nvpair_t *);        int nvpair_value_int32(const nvpair_t *, int32_t *);
//! ```
//!
//! libzfs_core is thread safe (it shares one `/dev/zfs` descriptor). Every call is one ioctl and so
//! one atomic operation: `lzc_snapshot` of several snapshots creates all or none.
//!
//! libzfs_core 2.1 cannot set `volsize` or read properties; those operations, and listings, go
//! through the `zfs` command ([`CommandZfs`]) even here.

use std::ffi::{c_char, c_int, c_uint, CStr, CString};
use std::fmt;
use std::io;
use std::ptr::{self, NonNull};
use std::sync::Arc;

use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};
use xatastor_core::ProvisionError;

use super::{dataset_of, parent_of, CloneProps, CommandZfs, DatasetProps, ListEntry, VolumeProps, ZfsOps};

/// `nvlist_t` (opaque).
#[repr(C)]
struct NvListT {
    _opaque: [u8; 0],
}

/// `nvpair_t` (opaque).
#[repr(C)]
struct NvPairT {
    _opaque: [u8; 0],
}

/// `boolean_t`: `typedef enum { B_FALSE, B_TRUE } boolean_t` — an `int`.
type BooleanT = c_int;
const B_FALSE: BooleanT = 0;

/// `LZC_DATSET_TYPE_ZVOL` of `enum lzc_dataset_type` (= `DMU_OST_ZVOL`).
const LZC_DATSET_TYPE_ZVOL: c_int = 3;

/// `ZPROP_N_MORE_ERRORS`: an errlist entry counting the errors left out.
const N_MORE_ERRORS: &str = "N_MORE_ERRORS";

/// The functions used, resolved from the two libraries.
struct Api {
    init: unsafe extern "C" fn() -> c_int,
    fini: unsafe extern "C" fn(),
    create: unsafe extern "C" fn(*const c_char, c_int, *mut NvListT, *mut u8, c_uint) -> c_int,
    snapshot: unsafe extern "C" fn(*mut NvListT, *mut NvListT, *mut *mut NvListT) -> c_int,
    clone: unsafe extern "C" fn(*const c_char, *const c_char, *mut NvListT) -> c_int,
    destroy: unsafe extern "C" fn(*const c_char) -> c_int,
    destroy_snaps: unsafe extern "C" fn(*mut NvListT, BooleanT, *mut *mut NvListT) -> c_int,
    exists: unsafe extern "C" fn(*const c_char) -> BooleanT,
    nvlist_alloc: unsafe extern "C" fn() -> *mut NvListT,
    nvlist_free: unsafe extern "C" fn(*mut NvListT),
    add_boolean: unsafe extern "C" fn(*mut NvListT, *const c_char),
    add_uint64: unsafe extern "C" fn(*mut NvListT, *const c_char, u64),
    add_string: unsafe extern "C" fn(*mut NvListT, *const c_char, *const c_char),
    next_nvpair: unsafe extern "C" fn(*mut NvListT, *const NvPairT) -> *mut NvPairT,
    nvpair_name: unsafe extern "C" fn(*const NvPairT) -> *const c_char,
    nvpair_value_int32: unsafe extern "C" fn(*const NvPairT, *mut i32) -> c_int,
    #[cfg(test)]
    add_int32: unsafe extern "C" fn(*mut NvListT, *const c_char, i32),
}

/// The loaded libraries. Dropping it calls `libzfs_core_fini` (if initialised) before unloading.
struct Loaded {
    api: Api,
    initialized: bool,
    zfs_core_name: String,
    // Field order: libzfs_core is unloaded before the libnvpair it depends on.
    _zfs_core: Library,
    _nvpair: Library,
}

impl Drop for Loaded {
    fn drop(&mut self) {
        if self.initialized {
            // SAFETY: `libzfs_core_init` succeeded once for this handle; `fini` releases that reference.
            unsafe { (self.api.fini)() };
        }
    }
}

/// Where to find the libraries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LzcConfig {
    /// Candidates for libzfs_core, tried in order (names or paths). Default: `libzfs_core.so.3`.
    pub libzfs_core: Vec<String>,
    /// Candidates for libnvpair, tried in order. Default: `libnvpair.so.3`.
    pub libnvpair: Vec<String>,
}

impl Default for LzcConfig {
    fn default() -> Self {
        Self { libzfs_core: vec!["libzfs_core.so.3".into()], libnvpair: vec!["libnvpair.so.3".into()] }
    }
}

fn unavailable(msg: impl fmt::Display) -> ProvisionError {
    ProvisionError::Backend(format!("{}{msg}", super::UNAVAILABLE))
}

fn open_first(candidates: &[String]) -> Result<(Library, String), String> {
    let mut errors = Vec::new();
    for name in candidates {
        // SAFETY: loading runs the library's initialisers; the OpenZFS libraries' have no
        // preconditions (they only set up internal tables).
        match unsafe { Library::open(Some(name), RTLD_NOW | RTLD_LOCAL) } {
            Ok(lib) => return Ok((lib, name.clone())),
            Err(e) => errors.push(format!("cannot load {name}: {e}")),
        }
    }
    if errors.is_empty() {
        errors.push("no library names configured".into());
    }
    Err(errors.join("; "))
}

/// Resolves `name` in `lib` as a `T`.
///
/// # Safety
///
/// `T` must be the function-pointer type of the C prototype of `name`.
unsafe fn symbol<T: Copy>(lib: &Library, lib_name: &str, name: &str) -> Result<T, String> {
    let cname = format!("{name}\0");
    // SAFETY: the caller guarantees `T` matches the symbol's prototype.
    unsafe { lib.get::<T>(cname.as_bytes()) }.map(|s| *s).map_err(|e| format!("{lib_name} lacks {name}: {e}"))
}

impl Loaded {
    /// Loads both libraries and resolves every function, without calling `libzfs_core_init`.
    fn load(config: &LzcConfig) -> Result<Self, String> {
        // libnvpair first: libzfs_core needs it, and a configured path is then found by soname.
        let (nvpair, nv_name) = open_first(&config.libnvpair)?;
        let (zfs_core, zc_name) = open_first(&config.libzfs_core)?;
        // SAFETY: each function-pointer type below is the prototype of its symbol in OpenZFS 2.1
        // include/libzfs_core.h and include/sys/nvpair.h, as listed in the module documentation.
        let api = unsafe {
            Api {
                init: symbol(&zfs_core, &zc_name, "libzfs_core_init")?,
                fini: symbol(&zfs_core, &zc_name, "libzfs_core_fini")?,
                create: symbol(&zfs_core, &zc_name, "lzc_create")?,
                snapshot: symbol(&zfs_core, &zc_name, "lzc_snapshot")?,
                clone: symbol(&zfs_core, &zc_name, "lzc_clone")?,
                destroy: symbol(&zfs_core, &zc_name, "lzc_destroy")?,
                destroy_snaps: symbol(&zfs_core, &zc_name, "lzc_destroy_snaps")?,
                exists: symbol(&zfs_core, &zc_name, "lzc_exists")?,
                nvlist_alloc: symbol(&nvpair, &nv_name, "fnvlist_alloc")?,
                nvlist_free: symbol(&nvpair, &nv_name, "fnvlist_free")?,
                add_boolean: symbol(&nvpair, &nv_name, "fnvlist_add_boolean")?,
                add_uint64: symbol(&nvpair, &nv_name, "fnvlist_add_uint64")?,
                add_string: symbol(&nvpair, &nv_name, "fnvlist_add_string")?,
                next_nvpair: symbol(&nvpair, &nv_name, "nvlist_next_nvpair")?,
                nvpair_name: symbol(&nvpair, &nv_name, "nvpair_name")?,
                nvpair_value_int32: symbol(&nvpair, &nv_name, "nvpair_value_int32")?,
                #[cfg(test)]
                add_int32: symbol(&nvpair, &nv_name, "fnvlist_add_int32")?,
            }
        };
        Ok(Self { api, initialized: false, zfs_core_name: zc_name, _zfs_core: zfs_core, _nvpair: nvpair })
    }

    /// `libzfs_core_init`: opens `/dev/zfs`.
    fn init(&mut self) -> Result<(), String> {
        // SAFETY: `init` has no preconditions; it is reference counted and paired with `fini` in Drop.
        let rc = unsafe { (self.api.init)() };
        if rc != 0 {
            return Err(format!(
                "libzfs_core_init failed: {} (cannot open /dev/zfs; is the zfs kernel module loaded?)",
                io::Error::from_raw_os_error(rc)
            ));
        }
        self.initialized = true;
        Ok(())
    }
}

fn cstring(s: &str) -> Result<CString, ProvisionError> {
    CString::new(s).map_err(|_| ProvisionError::InvalidArgument(format!("{s:?} contains a NUL byte")))
}

/// An owned `nvlist_t`, freed with `fnvlist_free`.
struct NvList<'a> {
    api: &'a Api,
    ptr: NonNull<NvListT>,
}

impl<'a> NvList<'a> {
    fn new(api: &'a Api) -> Result<Self, ProvisionError> {
        // SAFETY: `fnvlist_alloc` has no preconditions (it aborts on allocation failure).
        let ptr = unsafe { (api.nvlist_alloc)() };
        NonNull::new(ptr)
            .map(|ptr| Self { api, ptr })
            .ok_or_else(|| ProvisionError::Backend("fnvlist_alloc returned NULL".into()))
    }

    /// Takes ownership of an nvlist that libzfs_core allocated (an errlist); `None` for NULL.
    ///
    /// # Safety
    ///
    /// `ptr` must be NULL or a valid nvlist that nothing else frees.
    unsafe fn from_raw(api: &'a Api, ptr: *mut NvListT) -> Option<Self> {
        NonNull::new(ptr).map(|ptr| Self { api, ptr })
    }

    fn add_boolean(&mut self, name: &str) -> Result<(), ProvisionError> {
        let name = cstring(name)?;
        // SAFETY: `self.ptr` is a live nvlist we own; `name` is NUL-terminated and outlives the call
        // (the nvlist copies it).
        unsafe { (self.api.add_boolean)(self.ptr.as_ptr(), name.as_ptr()) };
        Ok(())
    }

    fn add_uint64(&mut self, name: &str, value: u64) -> Result<(), ProvisionError> {
        let name = cstring(name)?;
        // SAFETY: as in `add_boolean`.
        unsafe { (self.api.add_uint64)(self.ptr.as_ptr(), name.as_ptr(), value) };
        Ok(())
    }

    #[cfg_attr(not(test), allow(dead_code))]
    fn add_string(&mut self, name: &str, value: &str) -> Result<(), ProvisionError> {
        let (name, value) = (cstring(name)?, cstring(value)?);
        // SAFETY: as in `add_boolean`; `value` is copied too.
        unsafe { (self.api.add_string)(self.ptr.as_ptr(), name.as_ptr(), value.as_ptr()) };
        Ok(())
    }

    #[cfg(test)]
    fn add_int32(&mut self, name: &str, value: i32) -> Result<(), ProvisionError> {
        let name = cstring(name)?;
        // SAFETY: as in `add_boolean`.
        unsafe { (self.api.add_int32)(self.ptr.as_ptr(), name.as_ptr(), value) };
        Ok(())
    }

    fn as_ptr(&self) -> *mut NvListT {
        self.ptr.as_ptr()
    }

    /// The names of all pairs, with their value where it is an `int32` (errlists map names to errnos).
    fn pairs(&self) -> Vec<(String, Option<i32>)> {
        let mut out = Vec::new();
        let mut pair: *mut NvPairT = ptr::null_mut();
        loop {
            // SAFETY: `self.ptr` is a live nvlist; `pair` is NULL (start) or the pair the previous call
            // returned, which stays valid while the list is not modified.
            pair = unsafe { (self.api.next_nvpair)(self.ptr.as_ptr(), pair) };
            if pair.is_null() {
                return out;
            }
            // SAFETY: `pair` is a valid pair of the list; the name it returns lives as long as the pair.
            let name_ptr = unsafe { (self.api.nvpair_name)(pair) };
            let name = if name_ptr.is_null() {
                String::new()
            } else {
                // SAFETY: `nvpair_name` returns a NUL-terminated string owned by the pair.
                unsafe { CStr::from_ptr(name_ptr) }.to_string_lossy().into_owned()
            };
            let mut value: i32 = 0;
            // SAFETY: `pair` is valid and `value` is a live i32; a non-int32 pair returns EINVAL.
            let rc = unsafe { (self.api.nvpair_value_int32)(pair, &mut value) };
            out.push((name, (rc == 0).then_some(value)));
        }
    }
}

impl Drop for NvList<'_> {
    fn drop(&mut self) {
        // SAFETY: we own the nvlist and free it exactly once.
        unsafe { (self.api.nvlist_free)(self.ptr.as_ptr()) };
    }
}

/// The `compression` property as the kernel stores it (`enum zio_compress`, OpenZFS
/// `include/sys/zio_compress.h` and the `compress_table` of `module/zcommon/zfs_prop.c`): index
/// properties are passed to `lzc_create`/`lzc_clone` as numbers. `None` for names this table lacks
/// (e.g. `zstd-3`), which then go through the `zfs` command.
#[must_use]
pub fn compression_index(name: &str) -> Option<u64> {
    Some(match name {
        "on" => 1,
        "off" => 2,
        "lzjb" => 3,
        "gzip" | "gzip-6" => 10,
        "gzip-1" => 5,
        "gzip-2" => 6,
        "gzip-3" => 7,
        "gzip-4" => 8,
        "gzip-5" => 9,
        "gzip-7" => 11,
        "gzip-8" => 12,
        "gzip-9" => 13,
        "zle" => 14,
        "lz4" => 15,
        "zstd" => 16,
        _ => return None,
    })
}

/// Maps an errno from libzfs_core to a typed error about `name` (callers handle the context-specific
/// cases first: `EEXIST` of a destroy means dependents, `ENOENT` of a create means a missing parent).
fn errno_error(op: &str, name: &str, errno: c_int) -> ProvisionError {
    let os = || io::Error::from_raw_os_error(errno);
    match errno {
        libc::EEXIST => ProvisionError::AlreadyExists(name.to_owned()),
        libc::ENOENT => ProvisionError::NotFound(name.to_owned()),
        libc::EBUSY => ProvisionError::Busy(name.to_owned()),
        libc::ENOSPC | libc::EDQUOT => ProvisionError::NoSpace(name.to_owned()),
        libc::EINVAL | libc::EDOM | libc::ERANGE | libc::ENAMETOOLONG | libc::EXDEV => {
            ProvisionError::InvalidArgument(format!("{op} {name}: {}", os()))
        }
        libc::EOPNOTSUPP => ProvisionError::Unsupported(format!("{op} {name}: {}", os())),
        libc::EPERM | libc::EACCES => ProvisionError::Backend(format!("{op} {name}: {}", os())),
        // OpenZFS's own codes (`zfs_errno_t`, include/sys/fs/zfs.h) start at 1024.
        e if e >= 1024 => ProvisionError::Backend(format!("{op} {name}: ZFS error {e}")),
        _ => ProvisionError::io(format!("{op} {name}"), os()),
    }
}

/// The first failure of an errlist (skipping the `N_MORE_ERRORS` count), or `fallback` with `rc`.
fn first_failure(errlist: Option<&NvList<'_>>, fallback: &str, rc: c_int) -> (String, c_int) {
    errlist
        .and_then(|l| {
            l.pairs()
                .into_iter()
                .find_map(|(name, v)| (name != N_MORE_ERRORS).then(|| (name, v.unwrap_or(rc))))
        })
        .unwrap_or_else(|| (fallback.to_owned(), rc))
}

/// libzfs_core through `dlopen`, with [`CommandZfs`] for what libzfs_core 2.1 lacks (see the
/// [module documentation](self)).
#[derive(Clone)]
pub struct LzcZfs {
    lib: Arc<Loaded>,
    cmd: CommandZfs,
}

impl fmt::Debug for LzcZfs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LzcZfs").field("library", &self.lib.zfs_core_name).field("cmd", &self.cmd).finish()
    }
}

impl LzcZfs {
    /// Loads libzfs_core and libnvpair and initialises libzfs_core (opens `/dev/zfs`). `cmd` serves
    /// the operations libzfs_core lacks.
    ///
    /// Fails with `Backend("ZFS is not available: …")` naming the library or step that failed.
    pub fn load(config: &LzcConfig, cmd: CommandZfs) -> Result<Self, ProvisionError> {
        let mut lib = Loaded::load(config).map_err(unavailable)?;
        lib.init().map_err(unavailable)?;
        Ok(Self { lib: Arc::new(lib), cmd })
    }

    /// The libzfs_core that was loaded (as configured: a name or a path).
    #[must_use]
    pub fn library(&self) -> &str {
        &self.lib.zfs_core_name
    }

    fn api(&self) -> &Api {
        &self.lib.api
    }

    fn set_compression(
        &self,
        props: &mut NvList<'_>,
        compression: Option<&str>,
    ) -> Result<bool, ProvisionError> {
        match compression {
            None => Ok(true),
            Some(c) => match compression_index(c) {
                Some(index) => props.add_uint64("compression", index).map(|()| true),
                None => Ok(false),
            },
        }
    }

    fn lzc_exists(&self, name: &str) -> Result<bool, ProvisionError> {
        let cname = cstring(name)?;
        // SAFETY: libzfs_core is initialised; `cname` is a NUL-terminated string that outlives the call.
        Ok(unsafe { (self.api().exists)(cname.as_ptr()) } != B_FALSE)
    }
}

impl ZfsOps for LzcZfs {
    fn implementation(&self) -> &'static str {
        "libzfs_core"
    }

    fn create_volume(&self, dataset: &str, props: &VolumeProps) -> Result<(), ProvisionError> {
        let mut nv = NvList::new(self.api())?;
        nv.add_uint64("volsize", props.volsize)?;
        nv.add_uint64("volblocksize", u64::from(props.volblocksize))?;
        if !self.set_compression(&mut nv, props.compression.as_deref())? {
            tracing::debug!(compression = ?props.compression, "compression not in the lzc table; using zfs create");
            return self.cmd.create_volume(dataset, props);
        }
        let name = cstring(dataset)?;
        // SAFETY: libzfs_core is initialised; `name` and the props nvlist are valid for the call and
        // not retained by it; no wrapping key (NULL, 0).
        let rc = unsafe {
            (self.api().create)(name.as_ptr(), LZC_DATSET_TYPE_ZVOL, nv.as_ptr(), ptr::null_mut(), 0)
        };
        match rc {
            0 => Ok(()),
            libc::ENOENT => {
                Err(ProvisionError::NotFound(format!("{} (parent of {dataset})", parent_of(dataset))))
            }
            e => Err(errno_error("create", dataset, e)),
        }
    }

    fn snapshot(&self, snapshots: &[String]) -> Result<(), ProvisionError> {
        let Some(first) = snapshots.first() else { return Ok(()) };
        let mut nv = NvList::new(self.api())?;
        for s in snapshots {
            nv.add_boolean(s)?;
        }
        let mut errlist: *mut NvListT = ptr::null_mut();
        // SAFETY: libzfs_core is initialised; `nv` is a valid nvlist; props may be NULL; `errlist` is a
        // valid out-pointer, and what it receives is owned (and freed) by us below.
        let rc = unsafe { (self.api().snapshot)(nv.as_ptr(), ptr::null_mut(), &mut errlist) };
        // SAFETY: libzfs_core hands the errlist (or NULL) over to the caller.
        let errlist = unsafe { NvList::from_raw(self.api(), errlist) };
        if rc == 0 {
            return Ok(());
        }
        let (name, errno) = first_failure(errlist.as_ref(), first, rc);
        Err(match errno {
            libc::EXDEV => ProvisionError::InvalidArgument(format!(
                "snapshot {name}: the snapshots of one call must be in one pool, one per dataset"
            )),
            libc::ENOENT => ProvisionError::NotFound(dataset_of(&name).to_owned()),
            e => errno_error("snapshot", &name, e),
        })
    }

    fn clone_snapshot(&self, origin: &str, dataset: &str, props: &CloneProps) -> Result<(), ProvisionError> {
        let mut nv = NvList::new(self.api())?;
        if !self.set_compression(&mut nv, props.compression.as_deref())? {
            return self.cmd.clone_snapshot(origin, dataset, props);
        }
        let (name, origin_c) = (cstring(dataset)?, cstring(origin)?);
        // SAFETY: libzfs_core is initialised; both strings and the nvlist are valid for the call.
        let rc = unsafe { (self.api().clone)(name.as_ptr(), origin_c.as_ptr(), nv.as_ptr()) };
        match rc {
            0 => Ok(()),
            libc::ENOENT if self.lzc_exists(origin)? => {
                Err(ProvisionError::NotFound(format!("{} (parent of {dataset})", parent_of(dataset))))
            }
            libc::ENOENT => Err(ProvisionError::NotFound(origin.to_owned())),
            e => Err(errno_error("clone", dataset, e)),
        }
    }

    fn destroy(&self, dataset: &str) -> Result<(), ProvisionError> {
        let name = cstring(dataset)?;
        // SAFETY: libzfs_core is initialised; `name` is valid for the call.
        let rc = unsafe { (self.api().destroy)(name.as_ptr()) };
        match rc {
            0 => Ok(()),
            // EEXIST from destroying a head dataset: it has children.
            libc::EEXIST => {
                let dependents = self
                    .cmd
                    .list(dataset)
                    .map(|l| l.into_iter().map(|e| e.name).filter(|n| n != dataset).collect())
                    .unwrap_or_default();
                Err(ProvisionError::HasDependents { what: dataset.to_owned(), dependents })
            }
            e => Err(errno_error("destroy", dataset, e)),
        }
    }

    fn destroy_snapshots(&self, snapshots: &[String]) -> Result<(), ProvisionError> {
        let Some(first) = snapshots.first() else { return Ok(()) };
        let mut nv = NvList::new(self.api())?;
        for s in snapshots {
            nv.add_boolean(s)?;
        }
        let mut errlist: *mut NvListT = ptr::null_mut();
        // SAFETY: as in `snapshot`; `defer` is B_FALSE (fail instead of deferring on clones/holds).
        let rc = unsafe { (self.api().destroy_snaps)(nv.as_ptr(), B_FALSE, &mut errlist) };
        // SAFETY: libzfs_core hands the errlist (or NULL) over to the caller.
        let errlist = unsafe { NvList::from_raw(self.api(), errlist) };
        if rc == 0 {
            return Ok(());
        }
        let (name, errno) = first_failure(errlist.as_ref(), first, rc);
        Err(match errno {
            // EEXIST: the snapshot is a branch point (has clones).
            libc::EEXIST => ProvisionError::HasDependents {
                dependents: self.clones(&name).unwrap_or_default(),
                what: name,
            },
            e => errno_error("destroy", &name, e),
        })
    }

    fn set_volsize(&self, dataset: &str, volsize: u64) -> Result<(), ProvisionError> {
        self.cmd.set_volsize(dataset, volsize)
    }

    fn properties(&self, dataset: &str) -> Result<DatasetProps, ProvisionError> {
        self.cmd.properties(dataset)
    }

    fn exists(&self, dataset: &str) -> Result<bool, ProvisionError> {
        self.lzc_exists(dataset)
    }

    fn list(&self, parent: &str) -> Result<Vec<ListEntry>, ProvisionError> {
        self.cmd.list(parent)
    }

    fn snapshots(&self, dataset: &str) -> Result<Vec<String>, ProvisionError> {
        self.cmd.snapshots(dataset)
    }

    fn clones(&self, snapshot: &str) -> Result<Vec<String>, ProvisionError> {
        self.cmd.clones(snapshot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_library_is_a_clear_error() {
        let config = LzcConfig {
            libzfs_core: vec!["libzfs_core-does-not-exist.so.3".into()],
            libnvpair: vec!["libnvpair-does-not-exist.so.3".into()],
        };
        let err = LzcZfs::load(&config, CommandZfs::new()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("ZFS is not available: cannot load libnvpair-does-not-exist.so.3"), "{msg}");
        let empty = LzcConfig { libzfs_core: vec![], libnvpair: vec![] };
        assert!(LzcZfs::load(&empty, CommandZfs::new())
            .unwrap_err()
            .to_string()
            .contains("no library names"));
    }

    #[test]
    fn default_sonames_are_the_openzfs_2_1_ones() {
        let c = LzcConfig::default();
        assert_eq!(
            (c.libzfs_core[0].as_str(), c.libnvpair[0].as_str()),
            ("libzfs_core.so.3", "libnvpair.so.3")
        );
    }

    #[test]
    fn default_load_on_this_host_either_works_or_says_why_not() {
        // On a host with ZFS this loads; everywhere else it must fail with the clear message.
        match LzcZfs::load(&LzcConfig::default(), CommandZfs::new()) {
            Ok(z) => assert_eq!(z.implementation(), "libzfs_core"),
            Err(e) => assert!(e.to_string().starts_with("ZFS is not available: "), "{e}"),
        }
    }

    #[test]
    fn errnos_map_to_typed_errors() {
        use ProvisionError as E;
        assert!(matches!(errno_error("create", "t/a", libc::EEXIST), E::AlreadyExists(n) if n == "t/a"));
        assert!(matches!(errno_error("destroy", "t/a", libc::ENOENT), E::NotFound(_)));
        assert!(matches!(errno_error("destroy", "t/a", libc::EBUSY), E::Busy(_)));
        assert!(matches!(errno_error("create", "t/a", libc::ENOSPC), E::NoSpace(_)));
        assert!(matches!(errno_error("create", "t/a", libc::EDQUOT), E::NoSpace(_)));
        assert!(matches!(errno_error("create", "t/a", libc::EDOM), E::InvalidArgument(_)));
        assert!(matches!(errno_error("create", "t/a", libc::EOPNOTSUPP), E::Unsupported(_)));
        assert!(matches!(errno_error("create", "t/a", 1043), E::Backend(m) if m.contains("ZFS error 1043")));
        assert!(matches!(errno_error("create", "t/a", libc::EIO), E::Io { .. }));
    }

    #[test]
    fn compression_names_map_to_zio_compress() {
        assert_eq!(compression_index("lz4"), Some(15));
        assert_eq!(compression_index("off"), Some(2));
        assert_eq!(compression_index("gzip"), compression_index("gzip-6"));
        assert_eq!(compression_index("zstd"), Some(16));
        assert_eq!(compression_index("zstd-3"), None, "levels go through the zfs command");
    }

    /// The real libraries, without a kernel module: dlopen, symbol resolution, nvlist building and
    /// iteration, and the init failure. Run with the Debian bookworm packages unpacked:
    /// `apt-get download libzfs4linux libnvpair3linux; dpkg -x … dir`, then
    /// `XATASTOR_ZFS_LIB_DIR=dir/lib/x86_64-linux-gnu cargo test -p zvol-backend -- --ignored`.
    #[test]
    #[ignore = "needs libzfs_core.so.3 and libnvpair.so.3 in $XATASTOR_ZFS_LIB_DIR (Debian libzfs4linux, libnvpair3linux)"]
    fn real_libraries_load_and_build_nvlists() {
        let dir = std::env::var("XATASTOR_ZFS_LIB_DIR").expect("XATASTOR_ZFS_LIB_DIR is not set");
        let config = LzcConfig {
            libzfs_core: vec![format!("{dir}/libzfs_core.so.3")],
            libnvpair: vec![format!("{dir}/libnvpair.so.3")],
        };
        let loaded = Loaded::load(&config).expect("the libraries load and have every symbol");
        let mut nv = NvList::new(&loaded.api).unwrap();
        nv.add_boolean("tank/a@s1").unwrap();
        nv.add_uint64("volsize", 1 << 30).unwrap();
        nv.add_string("origin", "tank/a@s0").unwrap();
        nv.add_int32("tank/b@s1", libc::EEXIST).unwrap();
        nv.add_int32(N_MORE_ERRORS, 3).unwrap();
        let pairs = nv.pairs();
        assert_eq!(
            pairs,
            vec![
                ("tank/a@s1".to_owned(), None),
                ("volsize".to_owned(), None),
                ("origin".to_owned(), None),
                ("tank/b@s1".to_owned(), Some(libc::EEXIST)),
                (N_MORE_ERRORS.to_owned(), Some(3)),
            ]
        );
        let mut errlist = NvList::new(&loaded.api).unwrap();
        errlist.add_int32(N_MORE_ERRORS, 1).unwrap();
        errlist.add_int32("tank/b@s1", libc::EBUSY).unwrap();
        assert_eq!(first_failure(Some(&errlist), "x", 5), ("tank/b@s1".to_owned(), libc::EBUSY));
        assert_eq!(first_failure(None, "x", 5), ("x".to_owned(), 5));
        drop(nv);
        drop(errlist);
        drop(loaded);
        // Without /dev/zfs the initialisation fails, with the clear message.
        if !std::path::Path::new("/dev/zfs").exists() {
            let err = LzcZfs::load(&config, CommandZfs::new()).unwrap_err().to_string();
            assert!(err.starts_with("ZFS is not available: libzfs_core_init failed"), "{err}");
        }
    }
}
