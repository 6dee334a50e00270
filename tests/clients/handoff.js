// Run by the MCP conformance suite as its "client" (it appends the URL of
// the scenario's server): hands that URL to the Rust test, which plays the
// client through Portico, and waits for the test to say it is done.
// Usage: handoff.js DIR URL
"use strict";
const fs = require("node:fs");
const path = require("node:path");

const [dir, url] = process.argv.slice(2);
fs.writeFileSync(path.join(dir, "url.tmp"), url);
fs.renameSync(path.join(dir, "url.tmp"), path.join(dir, "url"));
const deadline = Date.now() + 60000;
const timer = setInterval(() => {
  if (fs.existsSync(path.join(dir, "done"))) {
    clearInterval(timer);
    process.exit(0);
  }
  if (Date.now() > deadline) {
    clearInterval(timer);
    process.stderr.write("the test did not finish within 60 s\n");
    process.exit(1);
  }
}, 50);
