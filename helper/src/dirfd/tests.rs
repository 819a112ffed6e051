use super::*;

use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

/// A root-owned 0755 directory under the test's temporary directory (itself root-owned
/// in the sticky `/tmp`, so the chain to it is one only root can change).
fn root_dir(base: &Path, name: &str) -> PathBuf {
    let p = base.join(name);
    fs::create_dir_all(&p).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    p
}

fn base() -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    fs::set_permissions(t.path(), fs::Permissions::from_mode(0o755)).unwrap();
    t
}

#[test]
fn a_link_where_only_root_writes_is_followed() {
    let t = base();
    let real = root_dir(t.path(), "real");
    let conf = root_dir(t.path(), "conf");
    symlink(&real, conf.join("link")).unwrap();
    // Relative, with `..`, as /etc/resolv.conf -> ../run/... is.
    symlink("../real", conf.join("rel")).unwrap();
    fs::write(real.join("f"), "x").unwrap();
    for via in ["link", "rel"] {
        let d = Dir::open(&conf.join(via)).unwrap();
        assert_eq!(d.stat(OsStr::new("f")).unwrap().map(|m| m.kind), Some(FileType::RegularFile), "{via}");
        let r = resolve(&conf.join(via).join("f"), Last::Follow, None, &mut |_, _| {}).unwrap();
        assert_eq!(r.path(), real.join("f"), "{via}");
    }
}

#[test]
fn a_link_in_a_directory_another_user_can_write_is_refused_naming_it() {
    let t = base();
    let real = root_dir(t.path(), "real");
    let www = root_dir(t.path(), "www");
    std::os::unix::fs::chown(&www, Some(33), Some(33)).unwrap();
    symlink(&real, www.join("site")).unwrap();
    let err = Dir::open(&www.join("site")).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}: a symbolic link in a directory writable by uid 33; refusing to follow it",
            www.join("site").display()
        )
    );
    // Below it, even in a root-owned directory: the user could have swapped that one in.
    let inner = root_dir(&www, "inner");
    symlink(&real, inner.join("l")).unwrap();
    let err = Dir::open(&inner.join("l")).unwrap_err();
    assert!(matches!(err, WalkError::LinkBelowUnsafe { .. }), "{err}");
    assert!(err.to_string().contains("which uid 33 can change; refusing to follow it"), "{err}");
    // Group- or world-writable directories owned by root are the same.
    let shared = root_dir(t.path(), "shared");
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o775)).unwrap();
    symlink(&real, shared.join("l")).unwrap();
    let err = Dir::open(&shared.join("l")).unwrap_err();
    assert!(err.to_string().contains("writable by group 0; refusing"), "{err}");
    // A link owned by another user, even where only root writes.
    let etc = root_dir(t.path(), "etc");
    symlink(&real, etc.join("l")).unwrap();
    std::os::unix::fs::lchown(etc.join("l"), Some(33), Some(33)).unwrap();
    let err = Dir::open(&etc.join("l")).unwrap_err();
    assert!(err.to_string().contains("a symbolic link owned by uid 33"), "{err}");
}

#[test]
fn directories_of_other_users_are_walked_and_created_in_by_descriptor() {
    let t = base();
    let www = root_dir(t.path(), "www");
    std::os::unix::fs::chown(&www, Some(33), Some(33)).unwrap();
    let mut made = Vec::new();
    let d = create_dir_all(&www.join("a/b"), NewDirs { mode: 0o750, uid: 33, gid: 33 }, &mut |p, _| {
        made.push(p.to_path_buf())
    })
    .unwrap();
    assert_eq!(made, [www.join("a"), www.join("a/b")]);
    let m = d.meta().unwrap();
    assert_eq!((m.uid, m.mode), (33, 0o750));
    // The last component is never a link when not followed.
    symlink("/etc", www.join("a/l")).unwrap();
    let r = resolve(&www.join("a/l"), Last::NoFollow, None, &mut |_, _| {}).unwrap();
    assert_eq!(r.parent.stat(OsStr::new("l")).unwrap().map(|m| m.kind), Some(FileType::Symlink));
    assert!(matches!(r.parent.subdir(OsStr::new("l")), Err(WalkError::Symlink(_))));
}

#[test]
fn remove_tree_removes_links_without_following_them() {
    let t = base();
    let victim = root_dir(t.path(), "victim");
    fs::write(victim.join("keep"), "x").unwrap();
    let gone = root_dir(t.path(), "gone");
    fs::create_dir_all(gone.join("a/b")).unwrap();
    symlink(&victim, gone.join("a/l")).unwrap();
    let top = Dir::open(t.path()).unwrap();
    top.remove_tree(OsStr::new("gone")).unwrap();
    assert!(!gone.exists());
    assert!(victim.join("keep").exists());
}

#[test]
fn missing_components_and_files_on_the_way_are_named() {
    let t = base();
    fs::write(t.path().join("f"), "").unwrap();
    let err = Dir::open(&t.path().join("f/x")).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{} exists and is a regular file, not a directory", t.path().join("f").display())
    );
    let err = Dir::open(&t.path().join("none/x")).unwrap_err();
    assert_eq!(err.to_string(), format!("{} does not exist", t.path().join("none").display()));
}

/// Every write of a directory descriptor refuses in a plan, whatever module calls it:
/// the tree is exactly as before, and each refusal names its path.
#[test]
fn every_write_refuses_while_planning() {
    let t = base();
    let top = root_dir(t.path(), "top");
    fs::write(top.join("f"), "x").unwrap();
    fs::create_dir(top.join("sub")).unwrap();
    symlink("/etc", top.join("l")).unwrap();
    let list = |p: &Path| {
        let mut v: Vec<_> = fs::read_dir(p).unwrap().map(|e| e.unwrap().file_name()).collect();
        v.sort();
        v
    };
    let before = list(&top);
    let plan = crate::plan::Plan::new();
    let dir = Dir::open(&top).unwrap();
    let new = NewDirs { mode: 0o755, uid: 0, gid: 0 };
    let refusals: Vec<Result<(), WalkError>> = crate::plan::in_thread(Some(plan), || {
        let file = dir.open_file(OsStr::new("f")).unwrap().unwrap();
        vec![
            dir.create_named(OsStr::new("new")).map(drop),
            dir.create_temp(OsStr::new("f")).map(drop),
            dir.mkdir(OsStr::new("d"), new).map(drop),
            dir.rename(OsStr::new("f"), OsStr::new("g")),
            dir.rename_from(&dir, OsStr::new("f"), OsStr::new("g")),
            dir.unlink(OsStr::new("f")),
            dir.remove_tree(OsStr::new("sub")),
            dir.symlink(Path::new("/etc"), OsStr::new("l2")),
            dir.chown_entry(OsStr::new("l"), 65534, 65534),
            set_attrs(file.as_fd(), &top.join("f"), 65534, 65534, None),
            set_attrs(file.as_fd(), &top.join("f"), 0, 0, Some(0o600)),
            resolve(&top.join("x/y"), Last::Follow, Some(new), &mut |_, _| {}).map(drop),
        ]
    });
    for (i, r) in refusals.iter().enumerate() {
        assert!(matches!(r, Err(WalkError::Plan(_))), "write {i} was not refused: {r:?}");
    }
    assert_eq!(list(&top), before);
    let m = fs::metadata(top.join("f")).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o7777), (0, 0o644));
    // Outside the plan the same calls work again.
    dir.unlink(OsStr::new("f")).unwrap();
}

#[test]
fn a_temporary_file_of_a_dead_writer_is_removed_and_a_live_writers_kept() {
    let t = base();
    let top = root_dir(t.path(), "top");
    // Pids are below pid_max: no process has this one.
    let dead: u32 = fs::read_to_string("/proc/sys/kernel/pid_max").unwrap().trim().parse().unwrap();
    let names = [
        format!(".f.opsagent-tmp.{dead}.0"),
        // Alive: pid 1 (another writer) and this process (a write in progress).
        ".f.opsagent-tmp.1.0".to_string(),
        format!(".f.opsagent-tmp.{}.999", std::process::id()),
        // Another target's, and a name that only looks like one.
        format!(".g.opsagent-tmp.{dead}.0"),
        ".f.opsagent-tmp.x.0".to_string(),
    ];
    for n in &names {
        fs::write(top.join(n), "partial").unwrap();
    }
    let dir = Dir::open(&top).unwrap();
    let (tmp, _f) = dir.create_temp(OsStr::new("f")).unwrap();
    let mut left: Vec<String> =
        fs::read_dir(&top).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    left.sort();
    let mut want: Vec<String> = names[1..].to_vec();
    want.push(tmp.into_string().unwrap());
    want.sort();
    assert_eq!(left, want);
}

#[test]
fn every_walk_starts_from_one_descriptor_of_root_and_a_caller_gets_its_own() {
    use std::os::fd::AsRawFd;
    let raw = |d: &Dir| d.as_fd().as_raw_fd();
    let (a, b) = (Dir::root().unwrap(), Dir::root().unwrap());
    assert_eq!(raw(&a), raw(&b), "`/` is opened once per process");
    assert_eq!(a.try_clone().map(|c| raw(&c)).unwrap(), raw(&a));
    // Trust is still worked out on each walk from `/`'s owner and mode.
    assert_eq!(a.opened().unwrap(), Dir::root().unwrap().opened().unwrap());
    let r = resolve(Path::new("/"), Last::Follow, None, &mut |_, _| {}).unwrap();
    assert!(r.name.is_none() && r.parent.path() == Path::new("/"));
    // A descriptor handed out as a file is a duplicate: closing it leaves `/`'s open.
    let f = r.parent.into_file().unwrap();
    assert_ne!(f.as_raw_fd(), raw(&a));
    drop(f);
    drop((a, b));
    let t = base();
    let d = root_dir(t.path(), "d");
    fs::write(d.join("f"), "x").unwrap();
    let r = resolve(&d.join("f"), Last::Follow, None, &mut |_, _| {}).unwrap();
    assert_eq!(r.stat_last().unwrap().map(|m| m.kind), Some(FileType::RegularFile));
}

#[test]
fn trust_is_read_only_when_asked_and_still_from_every_directory_on_the_way() {
    let t = base();
    let www = root_dir(t.path(), "www");
    std::os::unix::fs::chown(&www, Some(33), Some(33)).unwrap();
    let inner = root_dir(&www, "inner");
    fs::write(inner.join("f"), "x").unwrap();
    let r = resolve(&inner.join("f"), Last::Follow, None, &mut |_, _| {}).unwrap();
    assert_eq!(r.stat_last().unwrap().map(|m| m.kind), Some(FileType::RegularFile));
    assert!(r.parent.opened.get().is_none() && r.parent.trusted.get().is_none(), "nothing read for a file found");
    // Asked afterwards: read from the directories the walk held, www (uid 33) breaking
    // the chain although inner is root's.
    let err = r.parent.root_controlled().unwrap_err();
    assert!(
        matches!(&err, WalkError::NotRootControlled { path, writer } if path == &www && writer == "uid 33"),
        "{err}"
    );
    // The same walk through directories only root controls.
    let etc = root_dir(t.path(), "etc");
    let r = resolve(&etc.join("f"), Last::Follow, None, &mut |_, _| {}).unwrap();
    r.parent.root_controlled().unwrap();
    // A link found by a walk after such directories is still refused, naming where.
    symlink(t.path(), inner.join("l")).unwrap();
    let err = resolve(&inner.join("l/f"), Last::Follow, None, &mut |_, _| {}).unwrap_err();
    assert!(matches!(&err, WalkError::LinkBelowUnsafe { below, .. } if below == &www), "{err}");
}

/// A directory with a birth time is listed once per process: a dead writer's file that
/// appears after the first listing is left to the next helper. Without a birth time the
/// directory is listed on every temporary file, and such a file goes at the next one.
#[test]
fn a_directory_is_listed_for_dead_temporaries_once_only_where_it_has_a_birth_time() {
    let t = base();
    let dead: u32 = fs::read_to_string("/proc/sys/kernel/pid_max").unwrap().trim().parse().unwrap();
    let late = format!(".f.opsagent-tmp.{dead}.1");
    for (name, born) in [("born", true), ("unborn", false)] {
        let top = root_dir(t.path(), name);
        fs::write(top.join(format!(".f.opsagent-tmp.{dead}.0")), "partial").unwrap();
        let mut dir = Dir::open(&top).unwrap();
        // A fixed birth time, so that this holds on a file system that records none too.
        let (meta, _) = dir.opened().unwrap();
        dir.opened = OnceLock::from((meta, born.then_some((1, 2))));
        let (first, _f) = dir.create_temp(OsStr::new("f")).unwrap();
        assert!(!top.join(format!(".f.opsagent-tmp.{dead}.0")).exists(), "{name}: the first dead file stays");
        fs::write(top.join(&late), "partial").unwrap();
        let (second, _g) = dir.create_temp(OsStr::new("f")).unwrap();
        assert_eq!(top.join(&late).exists(), born, "{name}: the file of a dead writer made after the first listing");
        assert!(top.join(first).exists() && top.join(second).exists(), "{name}: this process's own files");
    }
}
