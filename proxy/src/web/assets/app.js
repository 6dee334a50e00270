// Portico web UI: copy buttons, the self-updating server list, live
// filters and delete confirmation. Everything works without it, less
// conveniently.
"use strict";

function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    return navigator.clipboard.writeText(text);
  }
  const area = document.createElement("textarea");
  area.value = text;
  document.body.appendChild(area);
  area.select();
  document.execCommand("copy");
  area.remove();
  return Promise.resolve();
}

document.addEventListener("click", (ev) => {
  const button = ev.target.closest("[data-copy]");
  if (!button) return;
  const source = document.getElementById(button.dataset.copy);
  if (!source) return;
  copyText(source.textContent).then(
    () => { button.textContent = "Copied"; },
    () => { button.textContent = "Copy failed"; },
  ).finally(() => setTimeout(() => { button.textContent = "Copy"; }, 1500));
});

document.addEventListener("submit", (ev) => {
  const form = ev.target;
  if (form.dataset.confirm && !window.confirm(form.dataset.confirm)) {
    ev.preventDefault();
  }
});

const live = document.querySelector("[data-live]");
if (live) {
  let busy = false;
  const refresh = async () => {
    if (busy) return;
    busy = true;
    try {
      const resp = await fetch(live.dataset.live, {
        credentials: "same-origin",
        redirect: "manual",
        headers: { "accept": "text/html" },
      });
      if (resp.type === "opaqueredirect" || resp.status === 401) {
        window.location.reload(); // the login ended
        return;
      }
      if (!resp.ok) return;
      const html = await resp.text();
      if (html !== live.dataset.shown) {
        live.innerHTML = html;
        live.dataset.shown = html;
      }
    } catch (_) {
      // The proxy is unreachable for a moment; try again at the next tick.
    } finally {
      busy = false;
    }
  };
  setInterval(refresh, 2000);

  const filters = document.getElementById("filters");
  if (filters) {
    let timer;
    filters.addEventListener("input", () => {
      clearTimeout(timer);
      timer = setTimeout(() => {
        const query = new URLSearchParams(new FormData(filters)).toString();
        history.replaceState(null, "", "/web" + (query ? "?" + query : ""));
        live.dataset.live = "/web/fragments/servers?" + query;
        refresh();
      }, 250);
    });
  }
}
