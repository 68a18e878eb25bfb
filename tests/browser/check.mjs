// Headless Chromium against a running Wharf: driven by tests/tests/browser.rs.
//
//   node check.mjs mqtt     WS_URL MQTT_PORT
//     A page connects with MQTT.js over WebSocket, subscribes, and must receive what
//     mosquitto_pub publishes over TCP.
//   node check.mjs console  WS_URL OPS_URL PASSWORD [SCREENSHOT]
//     A page connects with MQTT.js (client id "browser-device"); the console, logged in through
//     its form, must list it, show its session, and publish a message it receives.
//
//   node check.mjs console-behind WS_URL OPS_URL PASSWORD CLIENT OWED
//     The console's "who is behind" table, searched for CLIENT, shows OWED messages owed.
//   node check.mjs console-bridge WS_URL OPS_URL PASSWORD FORWARDED
//     The console's bridge table shows the bridge "cloud" connected, with at least FORWARDED
//     messages forwarded.
//   node check.mjs console-login WS_URL OPS_URL PASSWORD IDLE
//     The console's own login form, its cookie, reload, logout, a login lapsing after IDLE
//     seconds unused, the charts filling, and the cluster table listing this host.
//   node check.mjs console-auth WS_URL OPS_URL PASSWORD
//     Users and rules in MongoDB added and removed from the console (two hosts listed).
//   node check.mjs console-trace WS_URL OPS_URL PASSWORD TOPIC CLIENT
//     The console's "where a message went": the one message on TOPIC is found and traced,
//     CLIENT owing it.
//
// WHARF_CONSOLE_SHOTS=dir keeps the views' screenshots there (docs/console-*.png).
//
// Prints "ok" on success; anything else is a failure (with the reason on stderr).
import { chromium } from "playwright-core";
import { execFileSync } from "node:child_process";
import { fileURLToPath } from "node:url";
import path from "node:path";

const here = path.dirname(fileURLToPath(import.meta.url));
const mqttJs = path.join(here, "node_modules/mqtt/dist/mqtt.min.js");
const [mode, wsUrl, ...rest] = process.argv.slice(2);
const patience = 20000;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});

// A blank page with MQTT.js, connected to Wharf over WebSocket and subscribed to `filter`;
// what it receives collects in window.received.
async function devicePage(context, clientId, filter) {
  const page = await context.newPage();
  page.on("console", (m) => console.error("[page]", m.text()));
  await page.setContent("<!doctype html><title>device</title>");
  await page.addScriptTag({ path: mqttJs });
  await page.evaluate(({ wsUrl, clientId, filter }) => new Promise((resolve, reject) => {
    window.received = [];
    const client = mqtt.connect(wsUrl, { clientId, protocolVersion: 5, reconnectPeriod: 0 });
    window.client = client;
    client.on("error", (e) => reject(String(e)));
    client.on("message", (topic, payload) => window.received.push([topic, payload.toString()]));
    client.on("connect", () => client.subscribe(filter, { qos: 1 }, (err) => err ? reject(String(err)) : resolve()));
  }), { wsUrl, clientId, filter });
  return page;
}

// The console in a new context, logged in through its own form (no browser dialog).
async function openConsole(opsUrl, password, contextOptions = {}) {
  const context = await browser.newContext(contextOptions);
  const page = await context.newPage();
  page.on("console", (m) => console.error("[console]", m.text()));
  await page.goto(opsUrl + "/console");
  await login(page, password);
  return page;
}

async function login(page, password) {
  await page.locator("#login").waitFor({ timeout: patience });
  await page.fill("#login-password", password);
  await page.click('#login-form button[type="submit"]');
  await page.locator("#main").waitFor({ timeout: patience });
}

// With WHARF_CONSOLE_SHOTS=dir, a view's screenshot (docs/console-*.png).
async function shot(locator, name) {
  const dir = process.env.WHARF_CONSOLE_SHOTS;
  if (dir) await locator.screenshot({ path: path.join(dir, name) });
}

async function received(page, payload) {
  await page.waitForFunction((p) => window.received.some(([, m]) => m === p), payload, { timeout: patience });
}

try {
  if (mode === "mqtt") {
    const [mqttPort] = rest;
    const context = await browser.newContext();
    const page = await devicePage(context, "browser-sub", "browser/#");
    const sent = "from-mosquitto-" + Date.now();
    execFileSync("mosquitto_pub", ["-h", "127.0.0.1", "-p", mqttPort, "-q", "1", "-t", "browser/x", "-m", sent]);
    await received(page, sent);
    const got = await page.evaluate(() => window.received);
    if (got.length !== 1 || got[0][0] !== "browser/x") throw new Error("received " + JSON.stringify(got));
  } else if (mode === "console") {
    const [opsUrl, password, screenshot] = rest;
    const device = await devicePage(await browser.newContext(), "browser-device", "console/#");
    const page = await openConsole(opsUrl, password, { viewport: { width: 1400, height: 900 } });
    const row = page.locator('tr[data-client-id="browser-device"]');
    await row.waitFor({ timeout: patience });
    const cells = await row.locator("td").allTextContents();
    if (cells[2] !== "5.0" || cells[4] !== "1") throw new Error("row " + JSON.stringify(cells));
    await row.click();
    await page.locator("#detail-json", { hasText: "console/#" }).waitFor({ timeout: patience });
    // Search narrows the list.
    await page.fill("#search", "no-such-client");
    await row.waitFor({ state: "detached", timeout: patience });
    await page.fill("#search", "browser-");
    await row.waitFor({ timeout: patience });
    // The publish form reaches the device.
    await page.fill("#p-topic", "console/test");
    await page.fill("#p-payload", "hello from the console");
    await page.click('#publish button[type="submit"]');
    await page.locator("#p-result", { hasText: "published" }).waitFor({ timeout: patience });
    await received(device, "hello from the console");
    // Live counts: the connections figure shows the device.
    await page.waitForFunction(() => Number(document.getElementById("s-connections").textContent) >= 1, null, { timeout: patience });
    if (screenshot) {
      await page.waitForTimeout(8000); // samples for the rates and the charts
      await page.screenshot({ path: screenshot, fullPage: true });
    }
  } else if (mode === "console-credentials-url") {
    // Opened as http://admin:PW@host/console, with no other credentials: the console's
    // requests must still work (fetch refuses URLs that carry credentials).
    const [opsUrl, password] = rest;
    const device = await devicePage(await browser.newContext(), "url-device", "url/#");
    const page = await (await browser.newContext()).newPage();
    const errors = [];
    page.on("console", (m) => console.error("[console]", m.text()));
    page.on("pageerror", (e) => errors.push(String(e)));
    const withCredentials = new URL(opsUrl + "/console");
    withCredentials.username = "admin";
    withCredentials.password = password;
    await page.goto(withCredentials.href);
    await login(page, password);
    await page.locator('tr[data-client-id="url-device"]').waitFor({ timeout: patience });
    await page.fill("#p-topic", "url/test");
    await page.fill("#p-payload", "from a credentials URL");
    await page.click('#publish button[type="submit"]');
    await page.locator("#p-result", { hasText: "published" }).waitFor({ timeout: patience });
    await received(device, "from a credentials URL");
    // A retained message, listed with its publisher (the admin API's client id).
    await page.fill("#p-topic", "url/state");
    await page.fill("#p-payload", "kept");
    await page.check("#p-retain");
    await page.click('#publish button[type="submit"]');
    await page.locator("#p-result", { hasText: "published" }).waitFor({ timeout: patience });
    await page.fill("#retained-filter", "url/#");
    await page.click("#retained-load");
    const retained = page.locator("#retained tbody tr", { hasText: "url/state" });
    await retained.waitFor({ timeout: patience });
    const cells = await retained.locator("td").allTextContents();
    if (cells[3] !== "wharf-admin") throw new Error("retained row " + JSON.stringify(cells));
    if (errors.length) throw new Error("page errors: " + errors.join("; "));
  } else if (mode === "console-behind") {
    // Who is behind: the stored session CLIENT, away, shows OWED messages owed.
    const [opsUrl, password, client, owed] = rest;
    const page = await openConsole(opsUrl, password);
    await page.fill("#behind-search", client);
    await page.click("#behind-load");
    const row = page.locator(`#behind tr[data-behind-id="${client}"]`);
    await row.waitFor({ timeout: patience });
    const cells = await row.locator("td").allTextContents();
    if (cells[3] !== owed || cells[4] === "–") throw new Error("behind row " + JSON.stringify(cells));
  } else if (mode === "console-trace") {
    const [opsUrl, password, topic, client] = rest;
    const page = await openConsole(opsUrl, password);
    await page.fill("#find-topic", topic);
    await page.click("#find-load");
    const found = page.locator("#found tbody tr");
    await found.first().waitFor({ timeout: patience });
    if ((await found.count()) !== 1) throw new Error("found " + (await found.count()) + " messages");
    await found.first().click();
    const row = page.locator(`#trace-table tr[data-trace-client="${client}"]`);
    await row.waitFor({ timeout: patience });
    const cells = await row.locator("td").allTextContents();
    if (!cells[3].startsWith("owed")) throw new Error("trace row " + JSON.stringify(cells));
    const summary = await page.locator("#trace-summary").textContent();
    if (!summary.includes("1 owed")) throw new Error("summary " + summary);
    await shot(page.locator("section", { has: page.locator("#trace") }), "console-trace.png");
  } else if (mode === "console-login") {
    // Its own login form: a wrong password is refused, the right one shows the console, the
    // login survives a reload, logout ends it, and an unused login lapses (the edge runs with
    // --admin-session-idle IDLE seconds). The charts fill (--admin-history-step 1).
    const [opsUrl, password, idle] = rest;
    const context = await browser.newContext();
    const page = await context.newPage();
    let dialogs = 0;
    page.on("dialog", (d) => { dialogs += 1; d.dismiss(); });
    page.on("console", (m) => console.error("[console]", m.text()));
    const unauthenticated = await page.goto(opsUrl + "/console");
    if (unauthenticated.status() !== 200) throw new Error("console page " + unauthenticated.status());
    await page.locator("#login").waitFor({ timeout: patience });
    if (await page.locator("#main").isVisible()) throw new Error("data shown before a login");
    await shot(page.locator("#login"), "console-login.png");
    await page.fill("#login-password", "not-the-password");
    await page.click('#login-form button[type="submit"]');
    await page.locator("#login-result", { hasText: "wrong" }).waitFor({ timeout: patience });
    await login(page, password);
    const cookies = await context.cookies();
    const cookie = cookies.find((c) => c.name === "wharf_console");
    if (!cookie || !cookie.httpOnly || cookie.sameSite !== "Strict") throw new Error("cookie " + JSON.stringify(cookies));
    // Charts: a point a second.
    await page.waitForFunction(() => {
      const chart = document.querySelector('.chart[data-series="connections"]');
      return chart && Number(chart.dataset.points) >= 2;
    }, null, { timeout: patience });
    // The cluster table lists this host, reporting.
    await page.locator('#cluster tr[data-host="h1"] td.ok').waitFor({ timeout: patience });
    // A reload keeps the login.
    await page.reload();
    await page.locator("#main").waitFor({ timeout: patience });
    // Logout ends it: the same cookie no longer opens the API.
    await page.click("#logout");
    await page.locator("#login").waitFor({ timeout: patience });
    const after = await page.evaluate(async () => (await fetch("/api/v1/overview")).status);
    if (after !== 401) throw new Error("after logout the API answered " + after);
    // An unused login lapses: the console goes back to its login form by itself.
    await login(page, password);
    const idleContext = await browser.newContext();
    await idleContext.addCookies(await context.cookies());
    await page.close();
    await new Promise((r) => setTimeout(r, (Number(idle) + 1) * 1000));
    const idlePage = await idleContext.newPage();
    await idlePage.goto(opsUrl + "/console");
    await idlePage.locator("#login").waitFor({ timeout: patience });
    if (dialogs) throw new Error(dialogs + " browser dialogs");
  } else if (mode === "console-auth") {
    // Users and rules in MongoDB from the console: a user added, listed, a rule added and
    // removed, the user removed; the cluster table lists both hosts.
    const [opsUrl, password] = rest;
    const page = await openConsole(opsUrl, password);
    await page.locator('#cluster tr[data-host="h1"]').waitFor({ timeout: patience });
    await page.locator('#cluster tr[data-host="h2"]').waitFor({ timeout: patience });
    await page.click("#auth-load");
    await page.fill("#u-name", "browser-user");
    await page.fill("#u-password", "browser-user-pw");
    await page.click('#user-form button[type="submit"]');
    const user = page.locator('#users tr[data-user="browser-user"]');
    await user.waitFor({ timeout: patience });
    await page.fill("#r-user", "browser-user");
    await page.selectOption("#r-action", "subscribe");
    await page.fill("#r-topics", "cmd/${username}");
    await page.click('#rule-form button[type="submit"]');
    const rule = page.locator('#rules tr[data-rule="cmd/${username}"]');
    await rule.waitFor({ timeout: patience });
    await page.fill("#r-topics", "bad/#/filter");
    await page.click('#rule-form button[type="submit"]');
    await page.locator("#r-result.bad", { hasText: "refused" }).waitFor({ timeout: patience });
    await shot(page.locator("section", { has: page.locator("#users") }), "console-users.png");
    await shot(page.locator("section", { has: page.locator("#cluster") }), "console-cluster.png");
    await rule.locator("button").click();
    await rule.waitFor({ state: "detached", timeout: patience });
    await user.locator("button").click();
    await user.waitFor({ state: "detached", timeout: patience });
  } else if (mode === "console-bridge") {
    // A bridge's row: connected, with what it forwarded counted.
    const [opsUrl, password, forwarded] = rest;
    const page = await openConsole(opsUrl, password);
    const row = page.locator("#bridges tbody tr", { hasText: "cloud" });
    await row.waitFor({ timeout: patience });
    await page.waitForFunction((want) => {
      const cells = [...document.querySelectorAll("#bridges tbody tr td")].map((td) => td.textContent);
      return cells[0] === "cloud" && cells[2] === "connected" && parseInt(cells[3], 10) >= want;
    }, Number(forwarded), { timeout: patience });
  } else {
    throw new Error("unknown mode " + mode);
  }
  console.log("ok");
} catch (e) {
  console.error(e);
  process.exitCode = 1;
} finally {
  await browser.close();
}
