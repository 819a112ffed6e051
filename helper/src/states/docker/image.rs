//! `linux.docker.pulled`, `linux.docker.built`, `linux.docker.pushed`.
//!
//! - pulled: `docker pull REPO:TAG` every round (as the original, which forced the
//!   pull). When the image id afterwards differs from before (a first pull included),
//!   that is the change: the listed `containers` (and their `_N` variants) are removed
//!   so that a `linux.docker.running` state recreates them from the new image, and the
//!   replaced image is removed when nothing else uses it. The same id: no change.
//! - built: `docker build -t TAG PATH` when the image is missing, `force` is set, or
//!   `PATH/Dockerfile` changed since the last successful run of the state (its MD5,
//!   kept by the shared checksum store; first sight counts, as the original's `tfirst`),
//!   or a file of `watch` did; `watch: true` rebuilds every round, as the adaptor made
//!   it `force`.
//!   A new image id removes `containers` as above.
//! - pushed: with `container`, `docker commit [--author] [--message] CONTAINER
//!   REPOSITORY:TAG` first (a commit makes a new image every time, so every round
//!   changes, as in the original; with Podman's client, `--format=docker` is added to
//!   a message, which Podman keeps only in that format). Then `docker push` every round. The push is a change
//!   when the image id differs from the one this state last pushed successfully (kept in
//!   `<state dir>/docker/pushed-<state id>`); only then are `dep_containers` removed.
//!
//! A plan (dry run) inspects the engine's images and containers (`docker image
//! inspect`, `docker container inspect`, `docker ps`) and asks no registry. pulled: a
//! missing image "pulled (image chosen by the registry)", a present one kept (only a
//! pull can tell whether the registry has a newer one). built: the apply's reason
//! (image missing, force, Dockerfile or watched file changed) as "built (REASON)",
//! the image id being known only after the build; a converged state plans nothing.
//! pushed: without `container`, the image id against the one last pushed, so exactly
//! the apply's "pushed (image ID)" and its removals, or nothing; with `container`, the
//! commit and the push of the image it makes (a new one every time).

use std::fs;
use std::io;

use opsagent_proto::catalogue::{LinuxDockerBuilt, LinuxDockerPulled, LinuxDockerPushed};
use opsagent_proto::newtypes::{AbsPath, StateId};
use opsagent_proto::param_types::Watch;
use opsagent_proto::request::Outcome;

use super::{
    check_container_name, check_reference, image_ref, short_id, state_file, Auth, Docker, DockerError, Engine, Report,
    TRANSFER_TIMEOUT,
};
use crate::cancel::Cancel;
use crate::checksums::ChecksumStore;
use crate::fsutil;
use crate::states::Ctx;

fn names(list: Option<&opsagent_proto::param_types::Array>, param: &'static str) -> Result<Vec<String>, DockerError> {
    let names: Vec<String> =
        list.into_iter().flat_map(|a| a.iter()).map(|n| n.trim().to_string()).filter(|n| !n.is_empty()).collect();
    for n in &names {
        check_container_name(param, n)?;
    }
    Ok(names)
}

pub async fn pulled(engine: &Engine, p: &LinuxDockerPulled, ctx: &Ctx, mut cancel: Cancel) -> Outcome {
    let mut report = Report::default();
    let reference = image_ref(&p.repo, &p.tag);
    let result = async {
        check_reference("repo", &reference)?;
        let containers = names(p.containers.as_ref(), "containers")?;
        let auth = Auth::for_image(
            &ctx.state_dir,
            &reference,
            p.username.as_deref(),
            p.password.as_deref(),
            &mut report,
            p.email.as_deref(),
        )?;
        let docker = Docker::new(engine)?.with_auth(auth);
        pull(&docker, &reference, &containers, &mut report, &mut cancel).await
    }
    .await;
    report.finish(&reference, result)
}

/// Pulls `reference`; on a new image id, removes `containers` and the old image.
pub async fn pull(
    docker: &Docker,
    reference: &str,
    containers: &[String],
    report: &mut Report,
    cancel: &mut Cancel,
) -> Result<(), DockerError> {
    let before = docker.image_id(reference, cancel).await?;
    if crate::plan::active() {
        // Whether the registry holds a newer image is known only by pulling, which a
        // plan does not do: a missing image would be pulled; a present one is kept.
        if before.is_none() {
            report.change(format!("image {reference}"), "pulled (image chosen by the registry)");
        }
        return Ok(());
    }
    docker.must(docker.spec(["pull", reference]).with_timeout(TRANSFER_TIMEOUT), report, cancel).await?;
    let after =
        docker.image_id(reference, cancel).await?.ok_or_else(|| DockerError::NoImage(reference.into(), "pull"))?;
    if before.as_deref().is_some_and(|b| super::same_id(b, &after)) {
        return Ok(());
    }
    let what = match &before {
        Some(old) => format!("pulled a new image {} (was {})", short_id(&after), short_id(old)),
        None => format!("pulled (image {})", short_id(&after)),
    };
    report.change(format!("image {reference}"), what);
    docker.remove_related(containers, "its image was replaced", report, cancel).await?;
    if let Some(old) = before {
        docker.remove_old_image(&old, report, cancel).await;
    }
    Ok(())
}

pub async fn built(engine: &Engine, p: &LinuxDockerBuilt, state: &StateId, ctx: &Ctx, mut cancel: Cancel) -> Outcome {
    let mut report = Report::default();
    let tag = p.tag.trim().to_string();
    let result = build(engine, p, &tag, state, ctx, &mut report, &mut cancel).await;
    report.finish(&tag, result)
}

async fn build(
    engine: &Engine,
    p: &LinuxDockerBuilt,
    tag: &str,
    state: &StateId,
    ctx: &Ctx,
    report: &mut Report,
    cancel: &mut Cancel,
) -> Result<(), DockerError> {
    check_reference("tag", tag)?;
    let containers = names(p.containers.as_ref(), "containers")?;
    let dir = p.path.abs();
    let dockerfile = AbsPath::parse(&dir.as_path().join("Dockerfile").to_string_lossy())
        .map_err(|source| DockerError::Path { param: "path", source })?;
    if !fs::metadata(dockerfile.as_path()).is_ok_and(|m| m.is_file()) {
        return Err(DockerError::param("path", format!("{dir} holds no Dockerfile")));
    }
    // `watch` as the adaptor read it: a list adds files whose change rebuilds, like the
    // Dockerfile's; `true` was its force.
    let mut watched = vec![dockerfile];
    if let Some(Watch::Files(files)) = &p.watch {
        watched.extend(files.iter().cloned());
    }
    let force = p.force || matches!(p.watch, Some(Watch::EveryRound));
    let docker = Docker::new(engine)?;
    let store = ChecksumStore::new(&ctx.state_dir);
    let check = store.check(state, &watched, true)?;
    let before = docker.image_id(tag, cancel).await?;
    let reason = if force {
        "force"
    } else if before.is_none() {
        "image missing"
    } else if check.triggered() && watched.len() == 1 {
        "Dockerfile changed"
    } else if check.triggered() {
        "the Dockerfile or a watched file changed"
    } else {
        if !crate::plan::active() {
            store.commit(&check)?;
        }
        return Ok(());
    };
    if crate::plan::active() {
        // The new image's id exists only once built; whether it differs from the
        // present one (and so whether `containers` go) is known only then.
        report.change(format!("image {tag}"), format!("built ({reason}); its image id is known only after the build"));
        if before.is_none() {
            // No image yet: the built one is new whatever it is.
            docker.remove_related(&containers, "its image was rebuilt", report, cancel).await?;
        } else if !containers.is_empty() {
            report.notes.push(format!(
                "{} removed if the build makes a new image",
                containers.iter().map(|c| format!("container {c}")).collect::<Vec<_>>().join(", ")
            ));
        }
        return Ok(());
    }
    let args = ["build", "--tag", tag, &dir.to_string()];
    docker.must(docker.spec(args).with_timeout(TRANSFER_TIMEOUT), report, cancel).await?;
    let after = docker.image_id(tag, cancel).await?.ok_or_else(|| DockerError::NoImage(tag.into(), "build"))?;
    let changed = !before.as_deref().is_some_and(|b| super::same_id(b, &after));
    let what = if changed {
        format!("built ({reason}), image {}", short_id(&after))
    } else {
        format!("built ({reason}), same image {}", short_id(&after))
    };
    report.change(format!("image {tag}"), what);
    if changed {
        docker.remove_related(&containers, "its image was rebuilt", report, cancel).await?;
        if let Some(old) = before {
            docker.remove_old_image(&old, report, cancel).await;
        }
    }
    store.commit(&check)?;
    Ok(())
}

pub async fn pushed(engine: &Engine, p: &LinuxDockerPushed, state: &StateId, ctx: &Ctx, mut cancel: Cancel) -> Outcome {
    let mut report = Report::default();
    let reference = image_ref(&p.repository, &p.tag);
    let result = push(engine, p, &reference, state, ctx, &mut report, &mut cancel).await;
    report.finish(&reference, result)
}

async fn push(
    engine: &Engine,
    p: &LinuxDockerPushed,
    reference: &str,
    state: &StateId,
    ctx: &Ctx,
    report: &mut Report,
    cancel: &mut Cancel,
) -> Result<(), DockerError> {
    check_reference("repository", reference)?;
    let dependents = names(p.dep_containers.as_ref(), "dep_containers")?;
    let auth = Auth::for_image(
        &ctx.state_dir,
        reference,
        p.username.as_deref(),
        p.password.as_deref(),
        report,
        p.email.as_deref(),
    )?;
    let docker = Docker::new(engine)?.with_auth(auth);
    if let Some(container) = p.container.as_deref().map(str::trim).filter(|c| !c.is_empty()) {
        check_container_name("container", container)?;
        let mut args = vec!["commit".to_string()];
        if let Some(a) = p.author.as_deref().filter(|a| !a.trim().is_empty()) {
            args.push(format!("--author={a}"));
        }
        if let Some(m) = p.message.as_deref().filter(|m| !m.trim().is_empty()) {
            // Podman keeps a commit message only in Docker's image format.
            if docker.is_podman(cancel).await {
                args.push("--format=docker".into());
            }
            args.push(format!("--message={m}"));
        }
        args.extend([container.to_string(), reference.to_string()]);
        if crate::plan::active() {
            // A commit makes a new image every time: its push is a change, and the
            // dependent containers go.
            report.change(format!("container {container}"), format!("committed to {reference}"));
            report.change(format!("image {reference}"), format!("pushed (the image committed from {container})"));
            return docker.remove_related(&dependents, "a new image was pushed", report, cancel).await;
        }
        docker.must(docker.spec(args), report, cancel).await?;
        report.change(format!("container {container}"), format!("committed to {reference}"));
    }
    let id = docker.image_id(reference, cancel).await?.ok_or_else(|| {
        DockerError::param(
            "repository",
            format!("image {reference} does not exist here; build, pull or commit it first"),
        )
    })?;
    // A plan pushes nothing: whether the push is a change is decided by the image this
    // state last pushed, which it reads.
    if !crate::plan::active() {
        docker.must(docker.spec(["push", reference]).with_timeout(TRANSFER_TIMEOUT), report, cancel).await?;
    }
    let memo = state_file(&ctx.state_dir, "pushed", state);
    let last = match fs::read_to_string(&memo) {
        Ok(s) => Some(s.trim().to_string()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(source) => return Err(DockerError::Io { path: memo, op: "read", source }),
    };
    if last.as_deref().is_some_and(|l| super::same_id(l, &id)) {
        return Ok(());
    }
    report.change(format!("image {reference}"), format!("pushed (image {})", short_id(&id)));
    docker.remove_related(&dependents, "a new image was pushed", report, cancel).await?;
    if crate::plan::active() {
        return Ok(());
    }
    if let Some(parent) = memo.parent() {
        let root = (nix::unistd::Uid::from_raw(0), nix::unistd::Gid::from_raw(0));
        fsutil::create_dir_all(parent, 0o700, root, &mut Vec::new())?;
    }
    let memo =
        AbsPath::parse(&memo.to_string_lossy()).map_err(|source| DockerError::Path { param: "state", source })?;
    fsutil::write_atomic(&memo, format!("{id}\n").as_bytes(), 0o600, 0, 0)?;
    Ok(())
}
