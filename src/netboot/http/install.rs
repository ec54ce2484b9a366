//! The install endpoints: the installer's kernel and initramfs, the
//! one-time plan, the image (to the holder of the attempt's session only,
//! with range requests so an interrupted download resumes), and the
//! agent's reports, each recorded as an event before it is acknowledged.
//!
//! - `GET /install/<mac>/vmlinuz`, `GET /install/<mac>/initrd.img`
//! - `GET /install/<mac>/plan?token=T[&netmask=M&gateway=G]` (consumes T)
//! - `GET /install/<mac>/image` (Bearer session)
//! - `POST /install/<mac>/report` (Bearer session, a [`Report`])
//!
//! The checks return `Result<_, Response>`: the error is the answer to send,
//! built once per refused request, so its size does not matter.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, Request, State as AxState};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::input::{self, InstallerFile};
use super::{controller_error, files, not_found, text, Http};
use crate::install::media::{Media, MediaState};
use crate::install::protocol::{ImageRef, InstallPlan, Report};
use crate::install::seed;
use crate::inventory::Node;
use crate::lifecycle::NodeEvent;
use crate::state::{Attempt, InstallStart, Stage};

/// The node behind `/install/<mac>/...`.
fn node_for(http: &Http, mac: &str) -> Option<Node> {
    input::url_node(&http.shared.inventory(), mac).cloned()
}

/// The node behind the URL and the media it installs from, or the answer
/// that says why not.
fn node_and_media(http: &Http, mac: &str) -> Result<(Node, Arc<Media>), Response> {
    let node = node_for(http, mac).ok_or_else(|| not_found("not a node of this homelab"))?;
    Ok((node, ready_media(http)?))
}

fn ready_media(http: &Http) -> Result<Arc<Media>, Response> {
    match http.shared.media() {
        MediaState::Ready(m) => Ok(m),
        MediaState::Preparing => Err(text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the controller is still preparing the installer; try again shortly\n",
        )),
        MediaState::NotNeeded => Err(not_found("no node installs from this controller")),
        MediaState::Failed(why) => Err(text(StatusCode::INTERNAL_SERVER_ERROR, format!("{why}\n"))),
    }
}

/// GET /install/<mac>/{vmlinuz,initrd.img}
pub(super) async fn installer_file(
    AxState(http): AxState<Arc<Http>>,
    UrlPath((mac, file)): UrlPath<(String, String)>,
    req: Request,
) -> Response {
    let (node, media) = match node_and_media(&http, &mac) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let path = match input::installer_file(&file) {
        Some(InstallerFile::Kernel) => &media.installer.kernel,
        Some(InstallerFile::Initrd) => &media.installer.initrd,
        None => return not_found("the installer has vmlinuz and initrd.img"),
    };
    let _ = http.shared.state.append_event(
        Some(&node.name),
        "install.fetch",
        &format!("installer {file} requested"),
        serde_json::json!({ "file": file }),
    );
    files::send(path, req, files::READ_SIZE, None).await
}

/// GET /install/<mac>/plan
pub(super) async fn plan(
    AxState(http): AxState<Arc<Http>>,
    UrlPath(mac): UrlPath<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let (node, media) = match node_and_media(&http, &mac) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let state = &http.shared.state;
    let record = match state.node(&node.name) {
        Ok(r) => r,
        Err(e) => return controller_error(e),
    };
    let token = query.get("token").map(String::as_str).unwrap_or("");
    // An installed node is never reinstalled without a request, whatever
    // token it holds: the lifecycle refuses it in start_install's transaction.
    let (attempt, session) =
        match state.start_install(&node.name, token) {
            Ok(InstallStart::Started(attempt, session)) => (attempt, session),
            Ok(InstallStart::Refused(r)) if r.from.has_installed_os() => {
                return text(
                    StatusCode::CONFLICT,
                    "this node is installed; it boots its own disk\n",
                )
            }
            Ok(InstallStart::Refused(r)) => {
                return text(StatusCode::CONFLICT, format!("not installing: {r}\n"))
            }
            Ok(InstallStart::BadToken) => return text(
                StatusCode::FORBIDDEN,
                "this install token is unknown, used or expired: reboot the node for a fresh one\n",
            ),
            Err(e) => return controller_error(e),
        };
    let inv = http.shared.inventory();
    let prefix = query
        .get("netmask")
        .and_then(|m| m.parse::<Ipv4Addr>().ok())
        .and_then(crate::agent::system::prefix_len);
    let gateway = query.get("gateway").and_then(|g| g.parse().ok());
    let net = seed::Network::for_node(&inv, prefix, gateway);
    let base = format!(
        "http://{}:{}",
        inv.controller.address, inv.controller.http_port
    );
    let built = (|| -> anyhow::Result<InstallPlan> {
        let key = super::authorized_key(state)?;
        let files = seed::render(
            &http.templates,
            &inv,
            &node,
            attempt.number,
            &net,
            &key,
            &format!("{base}/phone-home/{}", node.mac),
        )?;
        Ok(InstallPlan {
            node: node.name.clone(),
            session,
            image: ImageRef {
                url: format!("{base}/install/{}/image", node.mac),
                sha256: media.image_sha256.clone(),
                size: media.image_size,
                compression: media.compression,
            },
            disk: node.disk.to_string(),
            may_overwrite: record.as_ref().is_some_and(|r| r.reinstall)
                || state.disk_written(&node.name)?,
            files,
            report_url: format!("{base}/install/{}/report", node.mac),
        })
    })();
    match built {
        Ok(plan) => Json(plan).into_response(),
        Err(e) => {
            let _ = state.fail_install(
                &attempt,
                &format!("the controller could not make the plan: {e:#}"),
            );
            controller_error(e)
        }
    }
}

/// The attempt a request's Bearer session belongs to.
fn session(http: &Http, node: &Node, headers: &HeaderMap) -> Result<Attempt, Response> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    match http.shared.state.install_session(&node.name, presented) {
        Ok(Some(a)) => Ok(a),
        Ok(None) => Err(text(
            StatusCode::FORBIDDEN,
            "no running install attempt has this session; reboot the node to start again\n",
        )),
        Err(e) => Err(controller_error(e)),
    }
}

/// GET /install/<mac>/image
pub(super) async fn image(
    AxState(http): AxState<Arc<Http>>,
    UrlPath(mac): UrlPath<String>,
    req: Request,
) -> Response {
    let Some(node) = node_for(&http, &mac) else {
        return not_found("not a node of this homelab");
    };
    if let Err(r) = session(&http, &node, req.headers()) {
        return r;
    }
    let media = match ready_media(&http) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let range = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let _ = http.shared.state.append_event(
        Some(&node.name),
        "install.image",
        &match &range {
            Some(r) => format!("image requested from {r} (resuming)"),
            None => "image requested".to_string(),
        },
        serde_json::json!({ "range": range }),
    );
    files::send(&media.image, req, files::IMAGE_READ_SIZE, None).await
}

/// POST /install/<mac>/report
pub(super) async fn report(
    AxState(http): AxState<Arc<Http>>,
    UrlPath(mac): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let report = match input::report(&headers, &body) {
        Ok(r) => r,
        Err((status, why)) => return text(status, why),
    };
    let Some(node) = node_for(&http, &mac) else {
        return not_found("not a node of this homelab");
    };
    let attempt = match session(&http, &node, &headers) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let state = &http.shared.state;
    let name = node.name.as_str();
    let message = input::report_text(&report);
    let result = match report {
        Report::Disk(d) => state
            .append_event(
                Some(name),
                "install.disk",
                &message,
                serde_json::to_value(&d).unwrap_or_default(),
            )
            .map(drop),
        Report::Progress {
            received, total, ..
        } => state.set_progress(name, received, total, &message),
        Report::HeadWritten => state.set_disk_written(name).and_then(|_| {
            state
                .append_event(
                    Some(name),
                    "install.head-written",
                    &message,
                    serde_json::Value::Null,
                )
                .map(drop)
        }),
        Report::Log { lines } => state
            .append_event(
                Some(name),
                "install.log",
                &message,
                serde_json::json!({ "lines": lines.len() }),
            )
            .map(drop),
        Report::Done { host_key, .. } => state.finish_install(&attempt, host_key.trim(), &message),
        Report::Failed { .. } => state.fail_install(&attempt, &message),
    };
    match result {
        Ok(()) => text(StatusCode::OK, "ok\n"),
        Err(e) => controller_error(e),
    }
}

/// A phone-home from the installed system (cloud-init posts its host key as a
/// form): the node is Installed when the key is the one pinned at install.
pub(super) fn installed_system_phoned_home(
    http: &Http,
    node: &Node,
    form: &HashMap<String, String>,
) {
    let state = &http.shared.state;
    let Some(presented) = form.get("pub_key_ed25519") else {
        return;
    };
    let Ok(Some(record)) = state.node(&node.name) else {
        return;
    };
    // Only a node rebooting into its fresh install phones home this way; the
    // transition below checks that again in its own transaction.
    if record.stage != Stage::Rebooting {
        return;
    }
    let pinned = state
        .host_key(&node.name)
        .ok()
        .flatten()
        .unwrap_or_default();
    let same = |a: &str, b: &str| {
        a.split_whitespace()
            .take(2)
            .eq(b.split_whitespace().take(2))
    };
    if same(presented, &pinned) {
        let _ = state.transition(
            &node.name,
            NodeEvent::PhonedHome,
            "the installed system is up and presented its pinned host key",
        );
    } else {
        let _ = state.append_event(
            Some(&node.name),
            "install.host-key-mismatch",
            "the installed system phoned home with a host key other than the one pinned at install; not trusted",
            serde_json::json!({ "presented": presented }),
        );
    }
}
