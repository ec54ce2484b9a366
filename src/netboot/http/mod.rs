//! The HTTP side of netboot (axum): per-node iPXE scripts, the iPXE binaries
//! for UEFI HTTP boot, the files of custom boot profiles (with range
//! requests), and the phone-home endpoint.
//!
//! Files are looked up by name from the inventory, never by joining a request
//! path onto a directory, so nothing else on the controller is reachable; a
//! profile file inside the state dir (where the secrets are) is refused too.
//!
//! Routes:
//! - `GET /boot/<mac>.ipxe`: the node's script (profile, installer or local
//!   disk, as [`boot_target`] decides), or for an unknown MAC a script that
//!   says so and installs nothing. MAC with `:` or `-`, any case.
//! - `GET /boot/ipxe/<file>`: one of the iPXE binaries ([`tftp::SERVED`]).
//! - `GET /files/<node>/<name>`: a file of the node's boot profile ([`profile_files`]).
//! - `GET|POST /phone-home/<mac>`: a known node reports in (small optional body).

mod conn;
mod files;
pub mod input;
mod install;

pub use files::{profile_files, ServedFile, PROGRESS_EVERY};

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result};
use axum::body::Bytes;
use axum::extract::{
    ConnectInfo, DefaultBodyLimit, FromRequestParts, Path as UrlPath, Request, State as AxState,
};
use axum::http::request::Parts;
use axum::http::{header, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use minijinja::context;
use tokio::sync::watch;

use super::boot::{boot_target, BootTarget};
use super::tftp::node_for_ip;
use super::Shared;
use crate::inventory::Node;
use crate::lifecycle::NodeEvent;
use crate::state::State;
use crate::templates::Templates;

/// Request bodies (only phone-home takes one) are at most this big.
pub const BODY_LIMIT: usize = 4096;
/// A handler has this long to produce its response head (bodies stream on).
pub const HANDLER_TIMEOUT: Duration = Duration::from_secs(15);
/// A connection with no progress either way for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections open at once; past this, accepting waits.
pub const MAX_CONNECTIONS: usize = 256;
/// A new connection has this long to send its first request head. Firmware
/// sends it at once; a client that opens connections and sends nothing (or
/// a byte now and then) holds a place for no longer than this, so a storm
/// of them delays a real client by this at most, never by [`IDLE_TIMEOUT`].
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

struct Http {
    shared: Arc<Shared>,
    templates: Arc<Templates>,
    /// Per node: the profile files sent in full since its last script fetch.
    served: Mutex<HashMap<String, HashSet<String>>>,
}

/// The router, for [`serve`] and for tests (`tower::ServiceExt::oneshot`).
pub fn router(shared: Arc<Shared>, templates: Arc<Templates>) -> Router {
    let http = Arc::new(Http {
        shared,
        templates,
        served: Mutex::new(HashMap::new()),
    });
    Router::new()
        .route("/boot/{file}", get(script))
        .route("/boot/ipxe/{file}", get(ipxe_binary))
        .route("/files/{node}/{name}", get(profile_file))
        .route("/phone-home/{mac}", get(phone_home).post(phone_home))
        .route("/install/{mac}/plan", get(install::plan))
        .route("/install/{mac}/image", get(install::image))
        .route(
            "/install/{mac}/report",
            axum::routing::post(install::report),
        )
        .route("/install/{mac}/{file}", get(install::installer_file))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn(handler_timeout))
        .with_state(http)
}

/// Serve on `listener` until `shutdown` flips, with the connection limits of
/// [`MAX_CONNECTIONS`], [`HEADER_TIMEOUT`] and [`IDLE_TIMEOUT`].
pub async fn serve(
    shared: Arc<Shared>,
    templates: Arc<Templates>,
    listener: tokio::net::TcpListener,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let local = listener.local_addr()?;
    let app = router(shared, templates).into_make_service_with_connect_info::<conn::Peer>();
    let listener = conn::Limited::new(
        listener,
        MAX_CONNECTIONS,
        conn::Timeouts {
            header: HEADER_TIMEOUT,
            idle: IDLE_TIMEOUT,
        },
    );
    tracing::info!(%local, "HTTP: serving iPXE scripts and boot files");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await
        .context("the HTTP server stopped")
}

async fn handler_timeout(req: Request, next: Next) -> Response {
    match tokio::time::timeout(HANDLER_TIMEOUT, next.run(req)).await {
        Ok(response) => response,
        Err(_) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the controller took too long to answer\n",
        ),
    }
}

/// The client's address, when served over a socket (absent under `oneshot`).
struct Client(Option<SocketAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Client {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Infallible> {
        Ok(Client(
            parts
                .extensions
                .get::<ConnectInfo<conn::Peer>>()
                .map(|c| c.0 .0),
        ))
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body.into(),
    )
        .into_response()
}

fn not_found(what: &str) -> Response {
    text(StatusCode::NOT_FOUND, format!("{what}\n"))
}

fn controller_error(e: anyhow::Error) -> Response {
    tracing::error!("HTTP: {e:#}");
    text(
        StatusCode::INTERNAL_SERVER_ERROR,
        "controller error; see its log\n",
    )
}

/// The controller's SSH public key (made on first use), for nodes'
/// authorized_keys.
pub fn authorized_key(state: &State) -> Result<String> {
    Ok(crate::ssh::ControllerKey::load_or_create(state.dir())?.public_openssh())
}

/// GET /boot/<mac>.ipxe
async fn script(
    AxState(http): AxState<Arc<Http>>,
    Client(client): Client,
    UrlPath(file): UrlPath<String>,
) -> Response {
    let Some(mac) = input::script_mac(&file) else {
        return not_found("no such script: ask for /boot/<mac>.ipxe");
    };
    let inv = http.shared.inventory();
    let node = inv.node_by_mac(mac);
    // A state read that fails must not look like "never installed": that
    // would reinstall an installed node.
    let record = match node.map(|n| http.shared.state.node(&n.name)).transpose() {
        Ok(r) => r.flatten(),
        Err(e) => return controller_error(e.context(format!("reading the state of {mac}"))),
    };
    let target = boot_target(node, record.as_ref());
    let base = format!(
        "http://{}:{}",
        inv.controller.address, inv.controller.http_port
    );
    let rendered = match (target, node) {
        (BootTarget::Profile, Some(n)) => render_profile(&http.templates, n, &base),
        (BootTarget::Installer, Some(n)) => render_installer(&http, n, &base),
        (BootTarget::LocalDisk, Some(n)) => http.templates.render(
            "pxe/local-disk.ipxe.j2",
            context! { name => n.name.clone(), mac => mac.to_string() },
        ),
        _ => http
            .templates
            .render("pxe/unknown.ipxe.j2", context! { mac => mac.to_string() }),
    };
    let body = match rendered {
        Ok(b) => b,
        Err(e) => return controller_error(e),
    };
    match node {
        Some(n) => record_script(&http, n, target, client),
        None => {
            tracing::info!(%mac, ?client, "HTTP: script for a machine not in the inventory; it was told so")
        }
    }
    text(StatusCode::OK, body)
}

/// Events and stage for a served script: Pending moves to Booting on the first
/// fetch, and a profile node starts a new boot (Booting) on every fetch.
fn record_script(http: &Http, node: &Node, target: BootTarget, client: Option<SocketAddr>) {
    if target == BootTarget::Profile {
        http.served
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&node.name);
    }
    let state = &http.shared.state;
    let label = match target {
        BootTarget::Profile => "its boot profile",
        BootTarget::Installer => "the installer",
        BootTarget::LocalDisk => "its local disk",
        BootTarget::Unknown => "nothing",
    };
    let from = client
        .map(|c| format!(" to {}", c.ip()))
        .unwrap_or_default();
    let _ = state.append_event(
        Some(&node.name),
        "http.script",
        &format!("iPXE script sent{from}: boot {label}"),
        serde_json::json!({ "target": target, "client": client.map(|c| c.ip().to_string()) }),
    );
    let event = match target {
        BootTarget::Profile => Some(NodeEvent::ProfileRequested),
        BootTarget::Installer => Some(NodeEvent::NetbootStarted),
        BootTarget::LocalDisk | BootTarget::Unknown => None,
    };
    if let Some(event) = event {
        let _ = state.transition(&node.name, event, &format!("fetching {label}"));
    }
}

fn render_profile(templates: &Templates, node: &Node, base: &str) -> Result<String> {
    let profile = node
        .boot
        .as_ref()
        .context("a profile target without a profile")?;
    let files = profile_files(profile);
    let url = |f: &ServedFile| format!("{base}/files/{}/{}", node.name, f.name);
    let initrds: Vec<_> = files[1..]
        .iter()
        .map(|f| context! { name => f.name.clone(), url => url(f) })
        .collect();
    templates.render(
        "pxe/profile.ipxe.j2",
        context! {
            name => node.name.clone(), mac => node.mac.to_string(),
            kernel_url => url(&files[0]), initrds => initrds, cmdline => profile.cmdline.clone(),
        },
    )
}

fn render_installer(http: &Http, node: &Node, base: &str) -> Result<String> {
    let mac = node.mac;
    let wait = |reason: String| {
        http.templates.render(
            "pxe/wait.ipxe.j2",
            context! {
                name => node.name.clone(), mac => mac.to_string(), reason => reason,
                script_url => format!("{base}/boot/{mac}.ipxe"),
            },
        )
    };
    match http.shared.media() {
        crate::install::media::MediaState::Ready(_) => {}
        crate::install::media::MediaState::Failed(why) => {
            return wait(format!(
                "the installer cannot run: {}",
                why.replace(['\n', '\r'], " ")
            ))
        }
        _ => return wait("the controller is preparing the installer".into()),
    }
    let token = http.shared.state.new_install_token(&node.name)?;
    http.templates.render(
        "pxe/installer.ipxe.j2",
        context! {
            name => node.name.clone(), mac => mac.to_string(),
            kernel_url => format!("{base}/install/{mac}/vmlinuz"),
            initrd_url => format!("{base}/install/{mac}/initrd.img"),
            plan_url => format!("{base}/install/{mac}/plan?token={token}"),
            cmdline => "console=tty0 console=ttyS0,115200 panic=30",
        },
    )
}

/// GET /boot/ipxe/<file>
async fn ipxe_binary(
    AxState(http): AxState<Arc<Http>>,
    Client(client): Client,
    UrlPath(file): UrlPath<String>,
    req: Request,
) -> Response {
    let Some((name, path)) =
        input::ipxe_binary(&http.shared.inventory().controller.ipxe_dir, &file)
    else {
        return not_found("not an iPXE binary served here");
    };
    if let Some(node) = client.and_then(|c| node_for_ip(&http.shared, c.ip())) {
        let _ = http.shared.state.append_event(
            Some(&node),
            "http.ipxe",
            &format!("{name} requested over HTTP"),
            serde_json::json!({ "file": name, "client": client.map(|c| c.ip().to_string()) }),
        );
    }
    files::send(&path, req, files::READ_SIZE, None).await
}

/// GET /files/<node>/<name>
async fn profile_file(
    AxState(http): AxState<Arc<Http>>,
    UrlPath((node_name, name)): UrlPath<(String, String)>,
    req: Request,
) -> Response {
    let inv = http.shared.inventory();
    let input::ProfileFile { node, files, file } =
        match input::profile_file(&inv, &node_name, &name) {
            Ok(f) => f,
            Err(why) => return not_found(why),
        };
    if inside(&file.path, http.shared.state.dir()).await {
        tracing::warn!(
            "HTTP: refusing {}: boot profile files inside the state dir are never served",
            file.path.display()
        );
        return not_found("not served");
    }
    let tracker = (req.method() == Method::GET).then(|| {
        let all = files.iter().map(|f| f.name.clone()).collect();
        files::Tracker::new(http.clone(), &node.name, &file.name, all)
    });
    files::send(&file.path, req, files::READ_SIZE, tracker).await
}

async fn inside(path: &Path, dir: &Path) -> bool {
    match (
        tokio::fs::canonicalize(path).await,
        tokio::fs::canonicalize(dir).await,
    ) {
        (Ok(p), Ok(d)) => p.starts_with(d),
        _ => false,
    }
}

/// GET|POST /phone-home/<mac>
async fn phone_home(
    AxState(http): AxState<Arc<Http>>,
    Client(client): Client,
    UrlPath(mac): UrlPath<String>,
    body: Bytes,
) -> Response {
    let inv = http.shared.inventory();
    let Some(node) = input::url_node(&inv, &mac) else {
        return not_found("not a node of this homelab");
    };
    let mut data = serde_json::json!({ "client": client.map(|c| c.ip().to_string()) });
    let home = input::phone_home(&body);
    if let Some((key, value)) = home.detail {
        data[key] = value;
    }
    let from = client
        .map(|c| format!(" from {}", c.ip()))
        .unwrap_or_default();
    match http.shared.state.append_event(
        Some(&node.name),
        "node.phoned-home",
        &format!("phoned home{from}"),
        data,
    ) {
        Ok(_) => {
            install::installed_system_phoned_home(&http, node, &home.form);
            text(StatusCode::OK, "ok\n")
        }
        Err(e) => controller_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_controller_key_is_made_once_and_kept_secret() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let a = authorized_key(&state).unwrap();
        assert!(a.starts_with("ssh-ed25519 "));
        assert_eq!(authorized_key(&state).unwrap(), a);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(
            crate::state::secret_path(dir.path(), crate::ssh::KEY_SECRET).unwrap(),
        )
        .unwrap()
        .permissions()
        .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
