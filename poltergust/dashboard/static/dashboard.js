/* Poltergust dashboard: show times in the viewer's zone, refresh the page's live parts, follow logs. */
(function () {
  "use strict";
  const REFRESH = Number(document.querySelector("main").dataset.refresh || 3000);
  const LOG_POLL = 2000;
  const sameDay = (a, b) => a.toDateString() === b.toDateString();

  function localise(root) {
    const now = new Date();
    root.querySelectorAll("[data-time], time[datetime]").forEach((el) => {
      const when = new Date(el.dataset.time || el.getAttribute("datetime"));
      if (isNaN(when)) return;
      const format = el.dataset.format || "datetime";
      let text;
      if (format === "hour") {
        text = when.toLocaleTimeString([], { hour: "numeric" });
      } else if (format === "time" || (format === "datetime" && sameDay(when, now))) {
        text = when.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
      } else {
        text = when.toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
      }
      if (el.tagName.toLowerCase() === "title") {
        el.dataset.text = el.dataset.text || el.textContent;
        el.textContent = text + " · " + el.dataset.text;
      } else {
        el.textContent = text;
        el.title = when.toLocaleString([], { dateStyle: "full", timeStyle: "long" });
      }
    });
  }

  const zone = document.getElementById("zone");
  if (zone) zone.textContent = Intl.DateTimeFormat().resolvedOptions().timeZone || "local time";
  localise(document);

  /* The filter: typing filters (after a pause), as does pressing Enter. */
  const filters = document.getElementById("filters");
  const input = document.getElementById("q");
  if (filters && input) {
    let pending = null;
    input.addEventListener("input", () => {
      clearTimeout(pending);
      pending = setTimeout(() => filters.requestSubmit(), 400);
    });
    if (input.value) {
      input.focus();
      input.setSelectionRange(input.value.length, input.value.length);
    }
  }

  /* Live parts: fetch this page again and swap every element with class "live" by id. */
  let refreshing = false;
  async function refresh() {
    if (refreshing || document.hidden) return;
    refreshing = true;
    try {
      const response = await fetch(location.href, { headers: { "Accept": "text/html" }, cache: "no-store" });
      if (!response.ok) return;
      const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
      document.querySelectorAll(".live[id]").forEach((el) => {
        const other = fresh.getElementById(el.id);
        if (other && other.innerHTML !== el.innerHTML) {
          el.innerHTML = other.innerHTML;
          localise(el);
        }
      });
      const updated = document.getElementById("updated");
      const freshUpdated = fresh.getElementById("updated");
      if (updated && freshUpdated) {
        updated.dataset.time = freshUpdated.dataset.time;
        localise(updated.parentNode);
      }
      updateLogs(fresh.getElementById("logs"));
    } catch (error) {
      /* the server is away for a moment: try again at the next tick */
    } finally {
      refreshing = false;
    }
  }
  setInterval(refresh, REFRESH);

  /* Logs: append new complete lines of each node's log while its run goes on. */
  function updateLogs(fresh) {
    const logs = document.getElementById("logs");
    if (!logs || !fresh) return;
    if (fresh.dataset.nodes !== logs.dataset.nodes || fresh.dataset.generation !== logs.dataset.generation) {
      logs.replaceWith(document.importNode(fresh, true));
      return;
    }
    if (logs.dataset.live === "1" && fresh.dataset.live !== "1") {
      followLogs(true); /* the run just ended: fetch what was written last */
    }
    logs.dataset.live = fresh.dataset.live;
  }

  let following = false;
  async function followLogs(force) {
    const logs = document.getElementById("logs");
    if (!logs || following || (!force && logs.dataset.live !== "1")) return;
    following = true;
    try {
      for (const pre of logs.querySelectorAll("pre.log[data-node]")) {
        const query = new URLSearchParams({ path: logs.dataset.path, name: logs.dataset.name,
          generation: logs.dataset.generation, node: pre.dataset.node, offset: pre.dataset.offset });
        const response = await fetch("/api/log?" + query, { cache: "no-store" });
        if (!response.ok) continue;
        const answer = await response.json();
        const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 8;
        if (answer.reset) pre.textContent = "";
        if (answer.text) pre.append(answer.text);
        pre.dataset.offset = answer.offset;
        if (atBottom) pre.scrollTop = pre.scrollHeight;
      }
    } catch (error) {
      /* try again at the next tick */
    } finally {
      following = false;
    }
  }
  setInterval(() => followLogs(false), LOG_POLL);
  document.querySelectorAll("pre.log").forEach((pre) => { pre.scrollTop = pre.scrollHeight; });
})();
