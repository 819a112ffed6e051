// Tests build their fixtures by path (helper/clippy.toml).
#![allow(clippy::disallowed_methods)]
use super::testutil::*;
use super::*;

use std::os::unix::fs::MetadataExt;
use tar::{EntryType, Header};

/// What the well-behaved test archive holds, in every format.
const FILES: &[(&str, &str, u32)] = &[("top.txt", "top\n", 0o644), ("bin/run.sh", "#!/bin/sh\n", 0o755)];

fn good_tar() -> Vec<u8> {
    tar_bytes(|b| {
        add_dir(b, "bin", 0o750);
        for (p, c, m) in FILES {
            add_file(b, p, c.as_bytes(), *m);
        }
        add_link(b, EntryType::Symlink, "bin/top-link", "../top.txt");
        add_link(b, EntryType::Link, "bin/hard", "top.txt");
    })
}

fn good_zip() -> Vec<u8> {
    zip_bytes(|z| {
        z.add_directory("bin/", zopts(0o750)).unwrap();
        for (p, c, m) in FILES {
            z.start_file(*p, zopts(*m)).unwrap();
            z.write_all(c.as_bytes()).unwrap();
        }
        z.add_symlink("bin/top-link", "../top.txt", zopts(0o777)).unwrap();
    })
}

struct Case {
    _tmp: tempfile::TempDir,
    archive: PathBuf,
    dest: PathBuf,
}

fn case(bytes: &[u8], name: &str) -> Case {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join(name);
    fs::write(&archive, bytes).unwrap();
    let dest = tmp.path().join("dest");
    fs::create_dir(&dest).unwrap();
    Case { _tmp: tmp, archive, dest }
}

fn run(c: &Case, format: ArchiveFormat) -> Result<Unpacked, UnpackError> {
    unpack(&c.archive, format, &c.dest, &Limits::default(), None)
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

#[test]
fn every_format_round_trips_files_dirs_links_and_modes() {
    let tarball = good_tar();
    let cases = [
        (tarball.clone(), "a.tar", ArchiveFormat::Tar),
        (gz(&tarball), "a.tgz", ArchiveFormat::TarGz),
        (bz2(&tarball), "a.tbz", ArchiveFormat::TarBz2),
        (good_zip(), "a.zip", ArchiveFormat::Zip),
    ];
    for (bytes, name, format) in cases {
        let c = case(&bytes, name);
        assert_eq!(ArchiveFormat::from_name(name), Some(format));
        assert_eq!(ArchiveFormat::sniff(&c.archive).unwrap(), format, "{name}");
        let done = unpack(&c.archive, format, &c.dest, &Limits::default(), Some((65534, 65534)))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        for (p, content, m) in FILES {
            let path = c.dest.join(p);
            assert_eq!(fs::read_to_string(&path).unwrap(), *content, "{name} {p}");
            assert_eq!(mode(&path), *m, "{name} {p}");
            let meta = fs::metadata(&path).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (65534, 65534), "{name} {p}");
        }
        assert_eq!(mode(&c.dest.join("bin")), 0o750, "{name}");
        assert_eq!(fs::metadata(c.dest.join("bin")).unwrap().uid(), 65534);
        let link = c.dest.join("bin/top-link");
        assert_eq!(fs::read_link(&link).unwrap(), Path::new("../top.txt"), "{name}");
        assert_eq!(fs::symlink_metadata(&link).unwrap().uid(), 65534, "{name}: the link itself is chowned");
        assert_eq!(fs::read_to_string(&link).unwrap(), "top\n");
        let file_bytes: u64 = FILES.iter().map(|(_, c, _)| c.len() as u64).sum();
        assert_eq!(done.bytes, file_bytes, "{name}");
        if format == ArchiveFormat::Zip {
            assert_eq!(done.entries, 4);
        } else {
            assert_eq!(done.entries, 5);
            let hard = c.dest.join("bin/hard");
            assert_eq!(fs::metadata(&hard).unwrap().ino(), fs::metadata(c.dest.join("top.txt")).unwrap().ino());
        }
    }
}

/// A plan's count (issue 19): reading an archive through gives what unpacking it
/// reports, in every format, and refuses what the unpack refuses by name.
#[test]
fn a_survey_counts_what_an_unpack_creates() {
    let tarball = good_tar();
    for (bytes, name, format) in [
        (tarball.clone(), "a.tar", ArchiveFormat::Tar),
        (gz(&tarball), "a.tgz", ArchiveFormat::TarGz),
        (good_zip(), "a.zip", ArchiveFormat::Zip),
    ] {
        let c = case(&bytes, name);
        let surveyed = survey(File::open(&c.archive).unwrap(), &c.archive, format, &Limits::default()).unwrap();
        let unpacked = run(&c, format).unwrap();
        assert_eq!(surveyed, unpacked, "{name}");
        assert!(surveyed.entries > 0 && surveyed.bytes > 0, "{name}: {surveyed:?}");
    }
    let escaping = tar_bytes(|b| add_link(b, EntryType::Symlink, "up", "../../etc"));
    let c = case(&escaping, "bad.tar");
    let err = survey(File::open(&c.archive).unwrap(), &c.archive, ArchiveFormat::Tar, &Limits::default()).unwrap_err();
    assert_eq!(err.to_string(), run(&c, ArchiveFormat::Tar).unwrap_err().to_string());
}

#[test]
fn names_and_magic_bytes_select_the_format() {
    use ArchiveFormat as F;
    for (name, want) in [
        ("x.tar", Some(F::Tar)),
        ("X.TGZ", Some(F::TarGz)),
        ("x.tar.gz", Some(F::TarGz)),
        ("x.gz", Some(F::TarGz)),
        ("x.bz", Some(F::TarBz2)),
        ("x.bz2", Some(F::TarBz2)),
        ("x.tbz", Some(F::TarBz2)),
        ("x.tbz2", Some(F::TarBz2)),
        ("x.tar.bz2", Some(F::TarBz2)),
        ("https://h/d/x.zip?token=1", Some(F::Zip)),
        ("x.rar", None),
        ("x.tar.xz", None),
        ("tar", None),
    ] {
        assert_eq!(F::from_name(name), want, "{name}");
    }
    let c = case(b"just some text, not an archive", "x");
    let err = F::sniff(&c.archive).unwrap_err();
    assert!(err.to_string().contains("not a tar, tar.gz, tar.bz2 or zip archive"), "{err}");
    // A pre-POSIX tar header (no "ustar" magic) is still recognised by its checksum.
    let mut h = Header::new_old();
    h.set_path("f").unwrap();
    h.set_size(0);
    h.set_cksum();
    let c = case(h.as_bytes(), "old");
    assert_eq!(F::sniff(&c.archive).unwrap(), F::Tar);
}

fn refused(bytes: Vec<u8>, format: ArchiveFormat) -> (Case, String) {
    let c = case(&bytes, "bad");
    let err = run(&c, format).expect_err("must be refused");
    let msg = err.to_string();
    (c, msg)
}

#[test]
fn absolute_names_and_dotdot_are_refused_naming_the_entry() {
    let (c, msg) = refused(tar_bytes(|b| add_raw(b, b"/tmp/evil", EntryType::Regular, b"x", None)), ArchiveFormat::Tar);
    assert!(msg.contains("entry \"/tmp/evil\": absolute paths are refused"), "{msg}");
    assert_eq!(fs::read_dir(&c.dest).unwrap().count(), 0);

    for name in [&b"../evil"[..], b"a/../../evil", b"a/..", b"a\\..\\..\\evil"] {
        let (c, msg) = refused(tar_bytes(|b| add_raw(b, name, EntryType::Regular, b"x", None)), ArchiveFormat::Tar);
        assert!(msg.contains("\"..\" components are refused"), "{msg}");
        assert!(msg.contains(&format!("{:?}", String::from_utf8_lossy(name))), "{msg}");
        assert!(!c.dest.parent().unwrap().join("evil").exists());
    }

    let zip = zip_bytes(|z| {
        z.start_file("../evil", zopts(0o644)).unwrap();
        z.write_all(b"x").unwrap();
    });
    let (_, msg) = refused(zip, ArchiveFormat::Zip);
    assert!(msg.contains("entry \"../evil\": \"..\" components are refused"), "{msg}");
    let zip = zip_bytes(|z| {
        z.start_file("/abs", zopts(0o644)).unwrap();
        z.write_all(b"x").unwrap();
    });
    let (_, msg) = refused(zip, ArchiveFormat::Zip);
    assert!(msg.contains("entry \"/abs\": absolute paths are refused"), "{msg}");
}

#[test]
fn symlinks_leaving_the_destination_are_refused() {
    for (path, target, why) in [
        ("l", "/etc", "absolute targets"),
        ("l", "..", "resolves outside"),
        ("a/b/l", "../../../x", "resolves outside"),
        // `d/up` is a valid link to the top; climbing again through it would escape.
        ("x", "d/up/../..", "after a name"),
    ] {
        let bytes = tar_bytes(|b| {
            add_dir(b, "d", 0o755);
            add_link(b, EntryType::Symlink, "d/up", "..");
            add_link(b, EntryType::Symlink, path, target);
        });
        let (c, msg) = refused(bytes, ArchiveFormat::Tar);
        assert!(msg.contains(&format!("entry {path:?}: symbolic link to {target:?} refused")), "{msg}");
        assert!(msg.contains(why), "{msg}");
        assert!(fs::symlink_metadata(c.dest.join(path)).is_err());
    }
    // The same rule for zip links.
    let zip = zip_bytes(|z| z.add_symlink("l", "/etc/passwd", zopts(0o777)).unwrap());
    let (_, msg) = refused(zip, ArchiveFormat::Zip);
    assert!(msg.contains("entry \"l\": symbolic link to \"/etc/passwd\" refused"), "{msg}");
}

#[test]
fn nothing_is_written_through_a_link_from_the_archive_or_already_in_dest() {
    let outside = tempfile::tempdir().unwrap();
    // The classic: a link to a directory, then a file "inside" it. Even a link that
    // stays inside dest is never written through.
    let bytes = tar_bytes(|b| {
        add_dir(b, "real", 0o755);
        add_link(b, EntryType::Symlink, "a", "real");
        add_file(b, "a/passwd", b"pwned", 0o644);
    });
    let (c, msg) = refused(bytes, ArchiveFormat::Tar);
    assert!(msg.contains("entry \"a/passwd\": a is a symbolic link; nothing is written through a link"), "{msg}");
    assert!(!c.dest.join("real/passwd").exists());

    // A link that already exists in dest, pointing outside.
    let c = case(&tar_bytes(|b| add_file(b, "a/passwd", b"pwned", 0o644)), "t.tar");
    std::os::unix::fs::symlink(outside.path(), c.dest.join("a")).unwrap();
    let msg = run(&c, ArchiveFormat::Tar).unwrap_err().to_string();
    assert!(msg.contains("a is a symbolic link"), "{msg}");
    assert!(!outside.path().join("passwd").exists());

    // A link at the final component is replaced, not followed.
    let victim = outside.path().join("victim");
    fs::write(&victim, "precious").unwrap();
    let c = case(&tar_bytes(|b| add_file(b, "f", b"new", 0o644)), "t.tar");
    std::os::unix::fs::symlink(&victim, c.dest.join("f")).unwrap();
    run(&c, ArchiveFormat::Tar).unwrap();
    assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
    assert!(fs::symlink_metadata(c.dest.join("f")).unwrap().is_file());
    assert_eq!(fs::read_to_string(c.dest.join("f")).unwrap(), "new");

    // A directory entry on an existing link is refused too.
    let before = mode(outside.path());
    let c = case(&tar_bytes(|b| add_dir(b, "d", 0o701)), "t.tar");
    std::os::unix::fs::symlink(outside.path(), c.dest.join("d")).unwrap();
    let msg = run(&c, ArchiveFormat::Tar).unwrap_err().to_string();
    assert!(
        msg.contains("entry \"d/\": d is a symbolic link") || msg.contains("entry \"d\": d is a symbolic link"),
        "{msg}"
    );
    assert_eq!(mode(outside.path()), before, "the mode of the link's target is untouched");
}

#[test]
fn hard_links_must_name_a_regular_file_already_inside() {
    for (target, why) in [
        ("/etc/passwd", "absolute paths are refused"),
        ("../outside", "\"..\" components are refused"),
        ("missing", "not in the archive"),
        ("sym", "sym is a symbolic link"),
        ("dir", "not a regular file"),
    ] {
        let bytes = tar_bytes(|b| {
            add_dir(b, "dir", 0o755);
            add_link(b, EntryType::Symlink, "sym", "dir");
            add_raw(b, b"h", EntryType::Link, b"", Some(target));
        });
        let (c, msg) = refused(bytes, ArchiveFormat::Tar);
        assert!(msg.contains(&format!("entry \"h\": hard link to {target:?} refused")), "{msg}");
        assert!(msg.contains(why), "{target}: {msg}");
        assert!(!c.dest.join("h").exists());
    }
}

#[test]
fn devices_and_fifos_are_refused() {
    for (ty, kind) in
        [(EntryType::Char, "character device"), (EntryType::Block, "block device"), (EntryType::Fifo, "FIFO")]
    {
        let (c, msg) = refused(tar_bytes(|b| add_raw(b, b"dev", ty, b"", None)), ArchiveFormat::Tar);
        assert_eq!(msg, format!("entry \"dev\": {kind} entries are refused"));
        assert!(fs::symlink_metadata(c.dest.join("dev")).is_err());
    }
}

#[test]
fn set_id_and_sticky_bits_are_dropped() {
    let bytes = tar_bytes(|b| {
        add_dir(b, "d", 0o1777);
        add_file(b, "d/suid", b"x", 0o4755);
        add_file(b, "d/sgid", b"x", 0o2711);
    });
    let c = case(&bytes, "t.tar");
    run(&c, ArchiveFormat::Tar).unwrap();
    assert_eq!(mode(&c.dest.join("d")), 0o777);
    assert_eq!(mode(&c.dest.join("d/suid")), 0o755);
    assert_eq!(mode(&c.dest.join("d/sgid")), 0o711);
    let meta = fs::metadata(c.dest.join("d/suid")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (0, 0), "no owner given: root");
}

/// The archive is measured against the free space of the target file system (a 1 MiB
/// tmpfs here), not only against the cap; nothing is left of the refused entry.
#[tokio::test]
async fn archives_larger_than_the_free_space_are_refused() {
    assert!(nix::unistd::geteuid().is_root(), "this test mounts a tmpfs: run it as root");
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("small");
    fs::create_dir(&dest).unwrap();
    // Through exec, the helper's one way to run a program (clippy.toml).
    let mount = crate::exec::CommandSpec::tool(
        "mount",
        [
            std::ffi::OsString::from("-t"),
            "tmpfs".into(),
            "-o".into(),
            "size=1m".into(),
            "tmpfs".into(),
            dest.clone().into(),
        ],
    );
    let mounted = crate::exec::run(&mount, &mut crate::cancel::Cancel::never()).await.unwrap();
    assert_eq!(mounted.exit, crate::exec::Exit::Code(0), "cannot mount a tmpfs: {}", mounted.output);
    let archive = tmp.path().join("big.tar");
    fs::write(
        &archive,
        tar_bytes(|b| {
            add_file(b, "a", &[b'a'; 600 * 1024], 0o644);
            add_file(b, "b", &[b'b'; 600 * 1024], 0o644);
        }),
    )
    .unwrap();
    let result = unpack(&archive, ArchiveFormat::Tar, &dest, &Limits::default(), None);
    let b_exists = dest.join("b").exists();
    let umount = crate::exec::CommandSpec::tool("umount", [dest.clone().into_os_string()]);
    let _ = crate::exec::run(&umount, &mut crate::cancel::Cancel::never()).await;
    let msg = result.unwrap_err().to_string();
    assert!(
        msg.starts_with("entry \"b\": the archive unpacks to more than the ") && msg.contains("bytes free"),
        "{msg}"
    );
    assert!(!b_exists);
}

#[test]
fn size_and_count_limits_are_enforced() {
    let bytes = tar_bytes(|b| {
        add_file(b, "a", &[b'a'; 600], 0o644);
        add_file(b, "b", &[b'b'; 600], 0o644);
    });
    let c = case(&bytes, "t.tar");
    let per_file = Limits { max_entry_bytes: 500, ..Limits::default() };
    let msg = unpack(&c.archive, ArchiveFormat::Tar, &c.dest, &per_file, None).unwrap_err().to_string();
    assert_eq!(msg, "entry \"a\": 600 bytes exceeds the limit of 500 bytes per file");

    let c = case(&bytes, "t.tar");
    let total = Limits { max_total_bytes: 1000, ..Limits::default() };
    let msg = unpack(&c.archive, ArchiveFormat::Tar, &c.dest, &total, None).unwrap_err().to_string();
    assert_eq!(msg, "entry \"b\": the archive unpacks to more than the limit of 1000 bytes in total");

    let c = case(&bytes, "t.tar");
    let count = Limits { max_entries: 1, ..Limits::default() };
    let msg = unpack(&c.archive, ArchiveFormat::Tar, &c.dest, &count, None).unwrap_err().to_string();
    assert_eq!(msg, "the archive has more than the limit of 1 entries");

    let zip = zip_bytes(|z| {
        for n in ["1", "2", "3"] {
            z.start_file(n, zopts(0o644)).unwrap();
        }
    });
    let c = case(&zip, "z.zip");
    let count = Limits { max_entries: 2, ..Limits::default() };
    let msg = unpack(&c.archive, ArchiveFormat::Zip, &c.dest, &count, None).unwrap_err().to_string();
    assert_eq!(msg, "the archive has more than the limit of 2 entries");

    // A zip bomb in miniature: 1 MiB of zeros compresses to a few KiB.
    let zip = zip_bytes(|z| {
        z.start_file("zeros", zopts(0o644).compression_method(zip::CompressionMethod::Deflated)).unwrap();
        z.write_all(&vec![0u8; 1 << 20]).unwrap();
    });
    assert!(zip.len() < 20_000);
    let c = case(&zip, "z.zip");
    let small = Limits { max_entry_bytes: 64 << 10, ..Limits::default() };
    let msg = unpack(&c.archive, ArchiveFormat::Zip, &c.dest, &small, None).unwrap_err().to_string();
    assert!(msg.starts_with("entry \"zeros\": 1048576 bytes exceeds"), "{msg}");
}

/// A reader that yields more than its header declared: the bytes written are capped too.
#[test]
fn bytes_written_are_checked_not_only_the_declared_size() {
    let tmp = tempfile::tempdir().unwrap();
    let limits = Limits { max_entry_bytes: 100, max_total_bytes: 150, max_entries: 10 };
    let mut x = Extractor {
        dest: Dir::open_given(tmp.path()).unwrap(),
        limits,
        room: u64::MAX,
        owner: (0, 0),
        done: Unpacked::default(),
        dir_modes: Vec::new(),
    };
    let mut liar = io::repeat(b'x').take(1000);
    let err = x.entry(b"liar", "liar", Kind::File { mode: 0o644, declared: 10 }, &mut liar).unwrap_err();
    assert_eq!(err.to_string(), "entry \"liar\": 1000 bytes exceeds the limit of 100 bytes per file");
    assert!(!tmp.path().join("liar").exists(), "the partial file is removed");

    let mut ok = io::repeat(b'x').take(100);
    x.entry(b"a", "a", Kind::File { mode: 0o644, declared: 100 }, &mut ok).unwrap();
    let mut more = io::repeat(b'x').take(60);
    let err = x.entry(b"b", "b", Kind::File { mode: 0o644, declared: 1 }, &mut more).unwrap_err();
    assert_eq!(err.to_string(), "entry \"b\": the archive unpacks to more than the limit of 150 bytes in total");
}

#[test]
fn corrupt_archives_fail_naming_the_archive() {
    let tarball = good_tar();
    let mut bytes = gz(&tarball);
    bytes.truncate(bytes.len() / 2);
    let c = case(&bytes, "cut.tgz");
    let msg = run(&c, ArchiveFormat::TarGz).unwrap_err().to_string();
    assert!(msg.contains("cut.tgz: corrupt or unreadable tar.gz archive"), "{msg}");

    let c = case(b"PK\x03\x04 not really", "bad.zip");
    let msg = run(&c, ArchiveFormat::Zip).unwrap_err().to_string();
    assert!(msg.contains("bad.zip: corrupt or unreadable zip archive"), "{msg}");
}

#[test]
fn a_later_entry_replaces_an_earlier_file_but_never_a_directory() {
    let bytes = tar_bytes(|b| {
        add_file(b, "f", b"one", 0o644);
        add_file(b, "f", b"two", 0o600);
    });
    let c = case(&bytes, "t.tar");
    run(&c, ArchiveFormat::Tar).unwrap();
    assert_eq!(fs::read_to_string(c.dest.join("f")).unwrap(), "two");
    assert_eq!(mode(&c.dest.join("f")), 0o600);

    let bytes = tar_bytes(|b| {
        add_dir(b, "d", 0o755);
        add_file(b, "d/in", b"x", 0o644);
        add_raw(b, b"d", EntryType::Regular, b"y", None);
    });
    let (c, msg) = refused(bytes, ArchiveFormat::Tar);
    assert!(msg.contains("entry \"d\": cannot replace the directory d"), "{msg}");
    assert!(c.dest.join("d/in").exists());
}

/// An entry whose declared size lies (a zip's header may): the survey inflates it no
/// further than one byte past the bound, as the extractor does, then refuses it. Without
/// the cap this reads the whole 64 GiB stream.
#[test]
fn a_survey_reads_no_further_than_the_bound_whatever_the_header_says() {
    let limits = Limits { max_entry_bytes: 1 << 20, ..Limits::default() };
    let mut s = Survey { limits, done: Unpacked::default() };
    let mut endless = io::repeat(0).take(64 << 30);
    let err = s.entry(b"bomb", "bomb", Kind::File { mode: 0o644, declared: 0 }, &mut endless).unwrap_err();
    assert!(matches!(err, UnpackError::EntryTooLarge { size, .. } if size == (1 << 20) + 1), "{err:?}");
    assert_eq!(endless.limit(), (64 << 30) - (1 << 20) - 1, "read past the bound");
}
