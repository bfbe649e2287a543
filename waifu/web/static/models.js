// The retrain button without a reload, and its progress: polls the task's state while it is queued or
// running, then reloads once to show the new version.
"use strict";

(function () {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const form = document.getElementById("retrain-form");
  const box = document.getElementById("retrain-status");
  const flash = document.getElementById("flash");
  let watching = false;

  function say(text, bad) {
    flash.textContent = text;
    flash.hidden = false;
    flash.classList.toggle("bad", !!bad);
  }

  function describe(s) {
    if (s.phase === "running") {
      let text = "running";
      if (s.epoch) text += `: epoch ${s.epoch}${s.epochs ? "/" + s.epochs : ""}`;
      if (typeof s.val_accuracy === "number") text += `, validation accuracy ${s.val_accuracy.toFixed(3)}`;
      return text;
    }
    if (s.phase === "queued") return "queued: waiting for the train worker";
    if (s.phase === "done" && !s.version) return `last retrain ${s.status}: ${s.reason}`;
    if (s.phase === "done") return `last retrain: v${s.version} ${s.status}${s.reason ? " (" + s.reason + ")" : ""}`;
    if (s.phase === "failed") return `last retrain failed: ${s.reason}`;
    if (s.phase === "unavailable") return s.reason;
    return "no retrain running";
  }

  async function poll() {
    const response = await fetch("/models/retrain/status", { headers: { "Accept": "application/json" } });
    if (!response.ok) { setTimeout(poll, 3000); return; }
    const s = await response.json();
    box.dataset.phase = s.phase;
    box.textContent = describe(s);
    if (s.phase === "queued" || s.phase === "running") { setTimeout(poll, 1000); return; }
    if (watching) window.location.reload();  // a new version (or a failure) to show
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const response = await fetch(form.getAttribute("action"), {
      method: "POST", body: new URLSearchParams(new FormData(form)),
      headers: { "X-CSRF-Token": csrf, "Accept": "application/json" },
    });
    const answer = await response.json().catch(() => ({}));
    say(answer.message || `refused (${response.status})`, !response.ok);
    watching = true;
    poll();
  });

  if (box.dataset.phase === "queued" || box.dataset.phase === "running") { watching = true; poll(); }
})();
