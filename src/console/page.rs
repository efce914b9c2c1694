//! The console's pages, rendered on the server as plain HTML strings.
//!
//! Everything from etcd is data an attacker may have written (any client
//! with write access to the namespace can put `<script>` in metadata), so
//! every value goes through [`esc`] and is cut to [`MAX_SHOWN`] characters;
//! the only script is the console's own, inline, which reads values from
//! the DOM as text.

use std::fmt::Write as _;

/// Characters of one value shown before it is cut.
pub(crate) const MAX_SHOWN: usize = 300;

/// Characters of one document (a service config) shown before it is cut.
pub(crate) const MAX_DOCUMENT: usize = 16 * 1024;

/// Escapes `s` for HTML text and quoted attribute values, cut to
/// [`MAX_SHOWN`] characters; control characters are shown escaped.
pub(crate) fn esc(s: &str) -> String {
    escape(s, MAX_SHOWN, false)
}

/// Escapes a multi-line document for a `<pre>` block: as [`esc`], but its
/// line breaks stay line breaks and it is cut at [`MAX_DOCUMENT`].
pub(crate) fn esc_document(s: &str) -> String {
    escape(s, MAX_DOCUMENT, true)
}

fn escape(s: &str, max: usize, lines: bool) -> String {
    let mut out = String::with_capacity(s.len().min(max) + 16);
    for (n, c) in s.chars().enumerate() {
        if n == max {
            out.push('…');
            break;
        }
        match c {
            '\n' if lines => out.push('\n'),
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => out.extend(c.escape_default()),
            c => out.push(c),
        }
    }
    out
}

/// Escapes `s` for a URL query value.
pub(crate) fn query(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b => {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

const STYLE: &str = r#"
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d2433;background:#f6f7f9}
header{background:#1d2433;color:#fff;padding:10px 20px;display:flex;gap:20px;align-items:center}
header a{color:#cfe0ff;text-decoration:none}header b{font-size:16px}
main{padding:16px 20px}
table{border-collapse:collapse;background:#fff;width:100%;margin:8px 0 20px}
th,td{border-bottom:1px solid #e3e6ea;padding:5px 8px;text-align:left;vertical-align:top}
th{background:#eef1f5;font-weight:600}
code,.mono{font-family:ui-monospace,monospace;font-size:12px;word-break:break-all}
pre.mono{white-space:pre-wrap;overflow-wrap:anywhere}
.banner{padding:8px 20px}.bad{background:#fde2e1;color:#8a1c14}.note{background:#fff4d6;color:#6b4e00}.ok{color:#17692c}
.tag{display:inline-block;border-radius:3px;padding:0 5px;font-size:12px;background:#e3e6ea}
.drained{background:#ffe0b3}.SERVING{color:#17692c}.warn{color:#8a1c14}
#live li{font-family:ui-monospace,monospace;font-size:12px}
button{font-size:12px}
"#;

/// The console's one script: live updates over Server-Sent Events, the
/// health probes, and the write actions (with the token kept in this tab).
const SCRIPT: &str = r#"
const live = document.getElementById('live');
const es = new EventSource('/events');
// One fetch of the table at a time, and at most one more queued: a burst
// of changes (a fleet restarting) costs a page a few fetches, not one each.
let running = false, again = false;
function refresh() {
  const body = document.querySelector('tbody[data-src]');
  if (!body) return;
  if (running) { again = true; return; }
  running = true;
  fetch(body.dataset.src).then(r => r.ok ? r.text() : Promise.reject(r.status))
    .then(html => { body.innerHTML = html; paint(); }).catch(() => {})
    .finally(() => { running = false; if (again) { again = false; setTimeout(refresh, 250); } });
}
es.onmessage = (m) => {
  const e = JSON.parse(m.data);
  const banner = document.getElementById('etcd');
  if (e.kind === 'etcd') {
    banner.textContent = e.ok ? '' : ('etcd unreachable: ' + e.error);
    banner.className = e.ok ? '' : 'banner bad';
    if (e.ok) refresh();
    return;
  }
  if (live) {
    const li = document.createElement('li');
    li.textContent = e.at + '  ' + e.kind + '  ' + e.service + '  ' + e.id + '  ' + e.addr;
    live.prepend(li);
    while (live.children.length > 100) live.lastChild.remove();
  }
  const page = document.body.dataset.service;
  if (page === undefined || page === '' || page === e.service) refresh();
};
es.onerror = () => {
  const banner = document.getElementById('etcd');
  banner.textContent = 'console connection lost; reconnecting';
  banner.className = 'banner bad';
};
es.onopen = () => { const b = document.getElementById('etcd'); if (b.textContent.startsWith('console')) { b.textContent=''; b.className=''; } };
// Probes run when the page opens and every 10 s while it stays open; a
// refreshed table shows the last results until the next round.
let probed = {};
function paint() {
  let unprobed = false;
  for (const cell of document.querySelectorAll('td[data-probe]')) {
    const p = probed[cell.dataset.probe];
    if (!p) { unprobed = true; continue; }
    cell.textContent = p.status + ' ' + p.ms + ' ms';
    cell.className = p.status;
  }
  for (const cell of document.querySelectorAll('td[data-traffic]')) {
    const p = probed[cell.dataset.traffic];
    if (p) cell.textContent = p.traffic || 'not reported';
  }
  // A row that arrived since the last round is probed now.
  if (unprobed && Object.keys(probed).length > 0 && !probing) probe();
}
let probing = false;
function probe() {
  const body = document.querySelector('tbody[data-health]');
  if (!body) return;
  probing = true;
  fetch(body.dataset.health).then(r => r.json())
    .then(all => { probing = false; probed = all; paint(); })
    .catch(() => { probing = false; });
}
if (document.querySelector('tbody[data-health]')) setInterval(probe, 10000);
function act(action, id, weight) {
  const token = document.getElementById('token');
  const out = document.getElementById('result');
  fetch('/api/override', {method: 'POST',
    headers: {'content-type': 'application/json', 'authorization': 'Bearer ' + (token ? token.value : '')},
    body: JSON.stringify({service: document.body.dataset.service, id: id, action: action, weight: weight})})
    .then(r => r.text().then(t => {
      out.textContent = t; refresh();
      if (r.ok && action === 'drain') watchDrain(id);
    }));
}
// After a drain: the instance's calls in flight, from its load report,
// every second until none is left (for two minutes at most).
let watching = null;
function watchDrain(id) {
  watching = id;
  const out = document.getElementById('result');
  let ticks = 0;
  const tick = () => {
    if (watching !== id || ticks++ > 120) return;
    const p = probed[id];
    if (p && p.traffic && p.traffic.startsWith('0 in flight')) {
      out.textContent = id + ' drained and idle: no call in flight';
      watching = null;
      return;
    }
    if (p && p.traffic) out.textContent = id + ' drained, waiting: ' + p.traffic;
    if (!probing) probe();
    setTimeout(tick, 1000);
  };
  tick();
}
document.addEventListener('click', (ev) => {
  const b = ev.target.closest('button[data-action]');
  if (!b) return;
  const id = b.closest('tr').dataset.id;
  if (b.dataset.action === 'weight') {
    const w = parseInt(b.previousElementSibling.value, 10);
    act('weight', id, w);
  } else act(b.dataset.action, id, null);
});
probe();
"#;

/// A whole page: header, a standing `notice` (read-only), the etcd banner
/// (kept live by the script), `body`, the live list (starting with `live`,
/// already escaped `<li>` items, newest first), the script.
pub(crate) fn layout(
    title: &str,
    service: Option<&str>,
    notice: &str,
    banner: &str,
    body: &str,
    live: &str,
) -> String {
    let notice = if notice.is_empty() {
        String::new()
    } else {
        format!("<div class=\"banner note\">{}</div>", esc(notice))
    };
    let data = service.map_or(String::new(), |s| format!(" data-service=\"{}\"", esc(s)));
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title} · tonic-etcd</title>\
         <style>{STYLE}</style></head><body{data}>\
         <header><b>tonic-etcd console</b><a href=\"/\">Services</a><a href=\"/etcd\">etcd</a></header>\
         {notice}<div id=\"etcd\"{banner_class}>{banner}</div><main>{body}\
         <h3>Live</h3><ul id=\"live\">{live}</ul></main><script>{SCRIPT}</script></body></html>",
        title = esc(title),
        banner_class = if banner.is_empty() {
            ""
        } else {
            " class=\"banner bad\""
        },
        banner = esc(banner),
    )
}

/// A table with a live body: `src` serves the rows again on every change.
pub(crate) fn table(headers: &[&str], rows: &str, src: &str, health: Option<&str>) -> String {
    let mut out = String::from("<table><thead><tr>");
    for h in headers {
        let _ = write!(out, "<th>{}</th>", esc(h));
    }
    let health = health.map_or(String::new(), |h| format!(" data-health=\"{}\"", esc(h)));
    let _ = write!(
        out,
        "</tr></thead><tbody data-src=\"{}\"{health}>{rows}</tbody></table>",
        esc(src)
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_from_etcd_are_text_never_markup() {
        let hostile = "<script>alert('x')</script>\"onload=\"x&";
        let shown = esc(hostile);
        assert!(!shown.contains('<') && !shown.contains('>') && !shown.contains('"'));
        assert_eq!(
            shown,
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&quot;onload=&quot;x&amp;"
        );
        assert_eq!(esc("a\u{0}b\nc"), "a\\u{0}b\\nc");
        let huge = "x".repeat(10_000);
        assert_eq!(esc(&huge).chars().count(), MAX_SHOWN + 1);
        assert_eq!(query("a b/c?d=é"), "a%20b%2Fc%3Fd%3D%C3%A9");
        // A document keeps its lines, and nothing else changes.
        assert_eq!(
            esc_document("{\n  \"<b>\": 1\u{0}\n}"),
            "{\n  &quot;&lt;b&gt;&quot;: 1\\u{0}\n}"
        );
        assert_eq!(esc_document(&huge).chars().count(), 10_000);
        let bigger = "x".repeat(MAX_DOCUMENT + 5);
        assert_eq!(esc_document(&bigger).chars().count(), MAX_DOCUMENT + 1);
    }

    #[test]
    fn a_page_escapes_its_title_and_service() {
        let page = layout("<x>", Some("s\"><script>"), "read <i>", "down <b>", "", "");
        assert!(page.contains("read &lt;i&gt;"));
        assert!(page.contains("&lt;x&gt;"));
        assert!(page.contains("data-service=\"s&quot;&gt;&lt;script&gt;\""));
        assert!(page.contains("down &lt;b&gt;"));
        // The console's own script is the only one.
        assert_eq!(page.matches("<script>").count(), 1);
    }
}
