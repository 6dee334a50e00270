// The web UI in a real browser (Debian's chromium, driven by
// playwright-core), as tests/e2e/web_ui.rs tells it. Where the story needs
// something done outside the browser (pctl moving apps), this script
// prints "STEP <name>" and waits for a line on stdin. Any failed
// expectation ends it with a non-zero status and says which.
"use strict";

const { chromium } = require("playwright-core");
const crypto = require("node:crypto");
const fs = require("node:fs");
const path = require("node:path");
const readline = require("node:readline");

const base = process.env.PORTICO_URL;
const shots = process.env.PORTICO_SHOTS;
const alicePw = process.env.ALICE_PW;
const bobPw = process.env.BOB_PW;

const input = readline.createInterface({ input: process.stdin });
const lines = input[Symbol.asyncIterator]();
async function step(name) {
  process.stdout.write(`STEP ${name}\n`);
  const { value, done } = await lines.next();
  if (done || value.trim() !== "ok") throw new Error(`step ${name}: the test answered ${JSON.stringify(value)}`);
}

function expect(cond, what) {
  if (!cond) throw new Error(`expected: ${what}`);
}

async function shot(page, name) {
  fs.mkdirSync(shots, { recursive: true });
  await page.screenshot({ path: path.join(shots, `${name}.png`), fullPage: true });
}

// The browser trusts exactly the proxy's certificate (its key's SHA-256).
function spkiPin(pemFile) {
  const cert = new crypto.X509Certificate(fs.readFileSync(pemFile));
  const der = cert.publicKey.export({ type: "spki", format: "der" });
  return crypto.createHash("sha256").update(der).digest("base64");
}

async function rows(page) {
  return page.$$eval("#servers tr[data-app]", (trs) => trs.map((t) => t.dataset.app));
}

async function login(page, user, password) {
  await page.goto(`${base}/web`);
  expect(new URL(page.url()).pathname === "/web/login", `an anonymous visit lands on the login page, not ${page.url()}`);
  await page.fill("input[name=user]", user);
  await page.fill("input[name=password]", password);
  await Promise.all([page.waitForNavigation(), page.click("button[type=submit]")]);
  expect(new URL(page.url()).pathname === "/web", `${user} lands on the server list, not ${page.url()}`);
}

async function logout(page) {
  await Promise.all([page.waitForNavigation(), page.click("#logout")]);
  expect(new URL(page.url()).pathname === "/web/login", "logging out shows the login page");
  expect((await page.textContent("main")).includes("You are logged out"), "the login page says so");
  await page.goto(`${base}/web`);
  expect(new URL(page.url()).pathname === "/web/login", "after logging out the list needs a login again");
}

async function main() {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", `--ignore-certificate-errors-spki-list=${spkiPin(process.env.PORTICO_CERT)}`],
  });
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  await context.grantPermissions(["clipboard-read", "clipboard-write"], { origin: base });
  const page = await context.newPage();
  page.on("dialog", (d) => d.accept());
  const external = [];
  page.on("request", (r) => {
    if (!r.url().startsWith(base)) external.push(r.url());
  });

  // A wrong password stays on the login page with the auth-service's answer.
  await page.goto(`${base}/web`);
  await shot(page, "login");
  await page.fill("input[name=user]", "alice");
  await page.fill("input[name=password]", "not-her-password");
  await page.click("button[type=submit]");
  await page.waitForSelector(".error");
  const refusal = await page.textContent(".error");
  expect(refusal.includes("invalid user name or password"), `a wrong password is refused: ${refusal}`);

  await login(page, "alice", alicePw);
  const html = await page.content();
  expect(!html.includes(process.env.ALICE_TOKEN_HINT || "\u0000"), "no token in the page");
  const cookies = await context.cookies();
  const session = cookies.find((c) => c.name === "portico_web");
  expect(session && session.httpOnly && session.secure && session.sameSite === "Strict", `the login cookie is HttpOnly, Secure, SameSite=Strict: ${JSON.stringify(session)}`);
  expect(!html.includes(session.value), "the login token is not in the HTML");

  // Exactly the servers alice's roles allow (not the prod one).
  expect(JSON.stringify(await rows(page)) === JSON.stringify(["tools-dev"]), `alice sees only tools-dev, not ${await rows(page)}`);
  await page.evaluate(() => { window.__noReload = true; });

  // An app created with pctl appears without a reload...
  await step("create fresh");
  await page.waitForSelector('#servers tr[data-app="fresh"]', { timeout: 15000 });
  expect(await page.evaluate(() => window.__noReload === true), "the list updated without a reload");
  await shot(page, "servers");

  // ...and one whose labels move away from every agent disappears.
  await step("move fresh");
  await page.waitForSelector('#servers tr[data-app="fresh"]', { state: "detached", timeout: 15000 });
  expect(await page.evaluate(() => window.__noReload === true), "the list updated without a reload");

  // Filters: a search that matches nothing, then a label filter.
  await page.fill("input[name=q]", "no-such-server");
  await page.waitForSelector("#servers tr.empty", { timeout: 10000 });
  await page.fill("input[name=q]", "");
  await page.fill("input[name=label]", "env=dev");
  await page.waitForSelector('#servers tr[data-app="tools-dev"]', { timeout: 10000 });

  // The server page: the tools alice may call, the snippets, copy buttons.
  await page.goto(`${base}/web/servers/tools-dev`);
  const tools = await page.$$eval("#tools tr[data-tool]", (trs) => trs.map((t) => t.dataset.tool));
  expect(tools.includes("echo") && tools.includes("touch"), `the allowed tools are listed: ${tools}`);
  expect(!tools.includes("delete_everything"), `the denied tool is not listed: ${tools}`);
  const claude = JSON.parse(await page.textContent("#config-claude"));
  expect(JSON.stringify(claude) === process.env.CLAUDE_SNIPPET, `the Claude snippet is psh mcp config's: ${JSON.stringify(claude)}`);
  const vscode = JSON.parse(await page.textContent("#config-vscode"));
  expect(vscode.servers["portico-tools-dev"].type === "stdio", "the VS Code snippet has its shape");
  const url = await page.textContent("#url");
  expect(url === `${base}/mcp/tools-dev`, `the Streamable HTTP URL: ${url}`);
  await page.click('[data-copy="config-claude"]');
  await page.waitForFunction(() => document.querySelector('[data-copy="config-claude"]').textContent === "Copied");
  const copied = await page.evaluate(() => navigator.clipboard.readText());
  expect(JSON.stringify(JSON.parse(copied)) === process.env.CLAUDE_SNIPPET, "the copy button copies the snippet");
  await shot(page, "server");

  // The audit log, newest first, filtered by app.
  await page.goto(`${base}/web/audit?app=tools-dev`);
  const apps = await page.$$eval("#events tbody tr[data-type] td:nth-child(4)", (tds) => tds.map((t) => t.textContent));
  expect(apps.length > 0 && apps.every((a) => a === "tools-dev"), `the app filter keeps tools-dev's events: ${apps}`);
  const times = await page.$$eval("#events tbody tr[data-type] td:nth-child(1)", (tds) => tds.map((t) => t.textContent));
  expect(times.every((t, i) => i === 0 || times[i - 1] >= t), "newest first");
  await page.goto(`${base}/web/audit?type=mcp.session.start&user=alice`);
  const types = await page.$$eval("#events tbody tr[data-type]", (trs) => trs.map((t) => t.dataset.type));
  expect(types.length > 0 && types.every((t) => t === "mcp.session.start"), `the type filter: ${types}`);
  await page.goto(`${base}/web/audit`);
  await shot(page, "audit");

  // The YAML editor refuses a bad file with its line number, then creates.
  await page.goto(`${base}/web/apps/new`);
  await page.fill("textarea[name=yaml]", "kind: app\nversion: v3\nmetadata:\n  name: web-made\n  labels: {env: dev}\nspec:\n  mcp:\n    command: 42x\n    bogus_field: 1\n");
  await page.click("#save");
  await page.waitForSelector("#error");
  const err = await page.textContent("#error");
  expect(/app\.yaml:9/.test(err) && err.includes("bogus_field"), `the error names line 9 and the field: ${err}`);
  await shot(page, "editor");
  await page.fill("textarea[name=yaml]", process.env.WEB_APP_YAML);
  await Promise.all([page.waitForNavigation(), page.click("#save")]);
  expect((await page.textContent(".notice")).includes("web-made"), "the list says the app was saved");
  await page.waitForSelector('#servers tr[data-app="web-made"]', { timeout: 15000 });
  await step("web-made exists");

  // Delete it from its page.
  await page.goto(`${base}/web/servers/web-made`);
  await Promise.all([page.waitForNavigation(), page.click("form[data-confirm] button")]);
  expect((await page.textContent(".notice")).includes("deleted"), "the list says the app was deleted");
  await step("web-made deleted");

  await logout(page);

  // A user whose roles allow nothing: an empty list and no audit page.
  await login(page, "bob", bobPw);
  expect((await rows(page)).length === 0, "bob sees no server");
  expect((await page.$('a[href="/web/audit"]')) === null, "bob has no audit link");
  expect((await page.$('a[href="/web/apps/new"]')) === null, "bob has no editor link");
  await shot(page, "denied");
  const resp = await page.goto(`${base}/web/audit`);
  expect(resp.status() === 403, `bob's audit page is refused: ${resp.status()}`);
  await page.goto(`${base}/web`);
  await logout(page);

  expect(external.length === 0, `nothing loads from outside the proxy: ${external}`);
  await browser.close();
  process.stdout.write("DONE\n");
  process.exit(0);
}

main().catch((e) => {
  process.stderr.write(`${e.stack || e}\n`);
  process.exit(1);
});
