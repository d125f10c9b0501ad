// The self-service page in headless Chromium against the local service (started by ./run):
// a requester asks, an approver approves from the inbox (which refreshes by itself), the
// grant counts down and the NSG rule appears in the ARM emulator; the requester extends and
// revokes, and the rule is gone. No inline script runs and no CSP violation happens.
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const BASE = process.env.PORTCULLIS_URL || 'http://127.0.0.1:3000';
const ARM = process.env.EMULATOR_URL || 'http://127.0.0.1:3001';
const SHOTS = process.env.SCREENSHOTS || new URL('../../docs/screenshots/', import.meta.url).pathname;
const SUB = '/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/demo-rg/providers';
const VM = `${SUB}/Microsoft.Compute/virtualMachines/demo-vm`;
const NSG = `${SUB}/Microsoft.Network/networkSecurityGroups/demo-nsg`;
const DESKTOP = { width: 1280, height: 800 };
const PHONE = { width: 375, height: 812 };

const t0 = Date.now();
const step = (what) => console.log(`  ${((Date.now() - t0) / 1000).toFixed(1).padStart(5)} s  ${what}`);

async function call(method, path, key, body) {
  const res = await fetch(BASE + path, {
    method,
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  return { status: res.status, body: await res.json().catch(() => null) };
}

async function nsgRules() {
  const form = new URLSearchParams({
    grant_type: 'client_credentials', client_id: 'demo-client', client_secret: 'demo-secret',
    scope: 'https://management.azure.com/.default',
  });
  const token = await (await fetch(`${ARM}/demo-tenant/oauth2/v2.0/token`, { method: 'POST', body: form })).json();
  const res = await fetch(`${ARM}${NSG}/securityRules?api-version=2024-05-01`, {
    headers: { authorization: `Bearer ${token.access_token}` },
  });
  assert.equal(res.status, 200, 'the emulator lists the NSG rules');
  return (await res.json()).value;
}

// Every page must run without a CSP violation or a script error.
const problems = [];
function watch(page, who) {
  page.on('console', (m) => {
    // A refused credential's 401 is logged by Chrome as a failed load: expected, not a problem.
    const failedLoad = /^Failed to load resource: the server responded with a status of 401/.test(m.text());
    if (/Content.Security.Policy/i.test(m.text()) || (m.type() === 'error' && !failedLoad)) problems.push(`${who} console ${m.type()}: ${m.text()}`);
  });
  page.on('pageerror', (e) => problems.push(`${who} page error: ${e.message}`));
}

async function shoot(page, name) {
  await page.screenshot({ path: join(SHOTS, `${name}-desktop.png`), fullPage: true });
  await page.setViewportSize(PHONE);
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 0, `${name}: no sideways scrolling at 375 px (overflow ${overflow}px)`);
  await page.screenshot({ path: join(SHOTS, `${name}-phone.png`), fullPage: true });
  await page.setViewportSize(DESKTOP);
}

async function everyInputLabelled(page) {
  const unlabelled = await page.evaluate(() => [...document.querySelectorAll('input, select, textarea')]
    .filter((e) => e.type !== 'hidden' && e.labels.length === 0).map((e) => e.id || e.name || e.outerHTML));
  assert.deepEqual(unlabelled, [], 'every input has a label');
}

async function signIn(page, key) {
  await page.getByLabel('API key').fill(key);
  await page.getByRole('button', { name: 'Sign in with API key' }).click();
}

const launch = () => chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
// Chromium has been seen to crash once at start-up on a loaded machine: one more try.
const browser = await launch().catch((e) => {
  console.log(`  Chromium did not start (${e.message.split('\n')[0]}); trying again`);
  return launch();
});
try {
  mkdirSync(SHOTS, { recursive: true });

  // The admin protects port 22 with manual approval by group ops.
  const put = await call('PUT', '/api/policies/demo-vm', 'demo-admin', {
    vm: VM, nsg: NSG, private_ip: '10.0.0.4',
    ports: [{ port: 22, max_duration: 'PT3H', allowed_sources: ['127.0.0.0/8'] }],
    approval: { mode: 'manual', approvers: ['group:ops'], required: 1 },
  });
  assert.ok([200, 201].includes(put.status), `policy created: ${JSON.stringify(put)}`);
  step('policy demo-vm created');

  // The page and its headers.
  const alice = await (await browser.newContext({ viewport: DESKTOP })).newPage();
  watch(alice, 'alice');
  const res = await alice.goto(BASE + '/');
  assert.equal(res.status(), 200);
  const csp = res.headers()['content-security-policy'] || '';
  assert.match(csp, /script-src 'self'(;|$)/, `CSP: ${csp}`);
  assert.match(csp, /default-src 'none'/);
  assert.doesNotMatch(csp, /unsafe-inline|unsafe-eval/);
  const sizes = await Promise.all(['/', '/ui/app.js', '/ui/app.css'].map(async (p) => (await (await fetch(BASE + p)).arrayBuffer()).byteLength));
  const total = sizes.reduce((a, b) => a + b, 0);
  step(`page: index.html ${sizes[0]} B + app.js ${sizes[1]} B + app.css ${sizes[2]} B = ${total} B`);
  assert.ok(total < 40_000, 'the page stays small');

  await alice.getByRole('heading', { name: 'Sign in' }).waitFor();
  await everyInputLabelled(alice);
  await shoot(alice, 'sign-in');
  step('sign-in page');

  // The approver first, so the request arrives in an open inbox.
  const bob = await (await browser.newContext({ viewport: DESKTOP })).newPage();
  watch(bob, 'bob');
  await bob.goto(BASE + '/');
  await signIn(bob, 'not-a-key');
  const bobMsg = bob.locator('#msg');
  await bobMsg.filter({ hasText: /^Sign-in refused: .*\(unauthenticated, HTTP 401\)/ }).waitFor();
  assert.equal(await bobMsg.getAttribute('role'), 'alert', 'errors are announced at once');
  await bob.getByLabel('API key').waitFor();
  step('a wrong key is refused with its code');
  await signIn(bob, 'demo-bob');
  await bob.locator('#who-name', { hasText: 'bob' }).waitFor();
  await bob.getByText('Nothing is waiting for you.').waitFor();
  await bobMsg.waitFor({ state: 'hidden' });
  await bob.evaluate(() => { window.stillTheSamePage = true; });
  step('bob signed in, inbox empty');

  // Alice signs in with the keyboard only, and asks for port 22 for an hour.
  await alice.getByLabel('API key').focus();
  await alice.keyboard.type('demo-alice');
  await alice.keyboard.press('Enter');
  await alice.locator('#who-name', { hasText: 'alice' }).waitFor();
  await alice.getByRole('heading', { name: 'Request access' }).waitFor();
  assert.equal(await alice.getByLabel('Source address').inputValue(), '127.0.0.1/32', 'source prefilled from whoami');
  await alice.getByLabel('Policy (VM)').selectOption('demo-vm');
  await alice.getByLabel(/^22\/tcp/).check();
  await alice.getByLabel('Duration').selectOption({ label: '1 h' });
  await alice.getByLabel('Justification').fill('INC-4711: restart the web service');
  await everyInputLabelled(alice);
  await shoot(alice, 'request-form');
  const created = alice.waitForResponse((r) => r.url().endsWith('/api/requests') && r.request().method() === 'POST');
  await alice.getByRole('button', { name: 'Request access' }).click();
  const answer = await created;
  assert.equal(answer.status(), 201);
  const sent = JSON.parse(answer.request().postData());
  assert.deepEqual(sent, { policy: 'demo-vm', ports: [22], duration: 'PT1H', justification: 'INC-4711: restart the web service', source: '127.0.0.1/32' });
  const request = await answer.json();
  assert.equal(request.state, 'pending');
  const id = request.id;
  const mine = alice.locator(`#mine-list > li[data-id="${id}"]`);
  await mine.getByText('waiting for approval').waitFor();
  await mine.getByRole('button', { name: 'Cancel request' }).waitFor();
  step(`alice asked: request ${id} pending`);

  // Bob's inbox shows it by itself (polling), and he approves.
  const waiting = bob.locator(`#inbox-list > li[data-id="${id}"]`);
  await waiting.waitFor({ timeout: 12_000 });
  assert.ok(await bob.evaluate(() => window.stillTheSamePage), 'the inbox refreshed without a reload');
  for (const text of ['alice', 'demo-vm', '22/tcp', '1 h', 'INC-4711: restart the web service', '127.0.0.1/32']) {
    await waiting.getByText(text, { exact: false }).first().waitFor();
  }
  await everyInputLabelled(bob);
  await shoot(bob, 'approver-inbox');
  await waiting.getByLabel('Comment or reason').fill('ok, go ahead');
  await waiting.getByRole('button', { name: 'Approve' }).click();
  await bobMsg.filter({ hasText: `Request ${id} approved` }).waitFor();
  await waiting.waitFor({ state: 'detached' });
  step('bob approved from the inbox');

  // Alice sees it active with a live countdown, without reloading.
  const countdown = mine.locator('.countdown');
  await countdown.waitFor({ timeout: 12_000 });
  const before = await countdown.textContent();
  assert.match(before, /^(0 h )?(59|60) min \d+ s left$/, before);
  await alice.waitForTimeout(2100);
  const after = await countdown.textContent();
  assert.notEqual(after, before, 'the countdown moves');
  assert.match(after, /min \d+ s left$/);
  await mine.getByText('active', { exact: true }).waitFor();
  await shoot(alice, 'my-access');
  step(`active, countdown "${before}" -> "${after}"`);

  let rule = (await nsgRules()).find((r) => r.name === `jit-${id}`);
  assert.ok(rule, `the NSG has the allow rule jit-${id}`);
  assert.equal(rule.properties.access, 'Allow');
  assert.equal(rule.properties.sourceAddressPrefix, '127.0.0.1/32');
  assert.equal(rule.properties.destinationPortRange ?? rule.properties.destinationPortRanges?.[0], '22');
  step(`the emulator's NSG has ${rule.name}`);

  // Extend by 30 minutes, then revoke.
  const msg = alice.locator('#msg');
  const endsBefore = Date.parse((await call('GET', `/api/requests/${id}`, 'demo-alice')).body.ends_at);
  await mine.getByLabel('Extend by').selectOption({ label: '30 min' });
  await mine.getByRole('button', { name: 'Extend' }).click();
  await msg.filter({ hasText: `Request ${id} extended` }).waitFor();
  const endsAfter = Date.parse((await call('GET', `/api/requests/${id}`, 'demo-alice')).body.ends_at);
  assert.equal(endsAfter - endsBefore, 30 * 60 * 1000, 'extended by 30 minutes');
  await countdown.filter({ hasText: /^1 h 2\d min/ }).waitFor();
  step('extended by 30 min');

  await mine.getByRole('button', { name: 'Revoke' }).click();
  await msg.filter({ hasText: `Request ${id} revoked` }).waitFor();
  await mine.locator('.badge', { hasText: 'revoked' }).waitFor();
  assert.equal(await mine.locator('.countdown').count(), 0);
  rule = (await nsgRules()).find((r) => r.name === `jit-${id}`);
  assert.equal(rule, undefined, 'the rule is gone from the NSG');
  step('revoked: the rule is gone');

  // The CSP holds: an injected inline script does not run (and reports a violation, which
  // is expected on this page only).
  const probe = await (await browser.newContext()).newPage();
  await probe.goto(BASE + '/');
  const blocked = await probe.evaluate(() => new Promise((done) => {
    document.addEventListener('securitypolicyviolation', (e) => done({ ran: window.inlineRan === true, directive: e.effectiveDirective }));
    const s = document.createElement('script');
    s.textContent = 'window.inlineRan = true';
    document.head.append(s);
    setTimeout(() => done({ ran: window.inlineRan === true, directive: null }), 2000);
  }));
  assert.deepEqual(blocked, { ran: false, directive: 'script-src-elem' }, 'inline scripts are blocked');
  step('an inline script is blocked by the CSP');

  // The OIDC authorization-code flow with PKCE, against a stand-in provider served through
  // Playwright's routing on the page's own origin (the local service configures no sign-in,
  // and the CSP would refuse another origin): the page sends S256 PKCE, state and nonce,
  // checks state, redeems the code with the verifier and uses the access token.
  const oidc = await (await browser.newContext({ viewport: DESKTOP })).newPage();
  watch(oidc, 'oidc');
  const provider = { authorize: null, redeemed: null };
  const b64url = (b) => Buffer.from(b).toString('base64url');
  await oidc.route(`${BASE}/ui/config.json`, (route) => route.fulfill({
    contentType: 'application/json',
    body: JSON.stringify({ oidc: {
      client_id: 'portcullis-api', authorize_url: `${BASE}/test-idp/authorize`, token_url: `${BASE}/test-idp/token`,
      scope: 'openid profile portcullis-api/.default', redirect_uri: `${BASE}/`,
    } }),
  }));
  await oidc.route(`${BASE}/test-idp/authorize?*`, (route) => {
    const q = new URL(route.request().url()).searchParams;
    provider.authorize = Object.fromEntries(q);
    route.fulfill({ status: 302, headers: { location: `${BASE}/?code=the-code&state=${encodeURIComponent(q.get('state'))}` } });
  });
  await oidc.route(`${BASE}/test-idp/token`, (route) => {
    provider.redeemed = Object.fromEntries(new URLSearchParams(route.request().postData()));
    const idToken = [b64url('{"alg":"none"}'), b64url(JSON.stringify({ nonce: provider.authorize.nonce })), ''].join('.');
    // The API accepts an API key as a bearer token: it stands in for Entra's access token.
    route.fulfill({ contentType: 'application/json', body: JSON.stringify({ access_token: 'demo-alice', id_token: idToken, token_type: 'Bearer' }) });
  });
  await oidc.goto(BASE + '/');
  await oidc.getByRole('button', { name: 'Sign in with your organisation' }).click();
  await oidc.locator('#who-name', { hasText: 'alice' }).waitFor();
  const a = provider.authorize;
  assert.equal(a.response_type, 'code');
  assert.equal(a.code_challenge_method, 'S256');
  assert.equal(a.client_id, 'portcullis-api');
  assert.equal(a.redirect_uri, `${BASE}/`);
  assert.equal(a.scope, 'openid profile portcullis-api/.default');
  assert.ok(a.state.length >= 16 && a.nonce.length >= 16 && a.state !== a.nonce);
  const r = provider.redeemed;
  assert.deepEqual(Object.keys(r).sort(), ['client_id', 'code', 'code_verifier', 'grant_type', 'redirect_uri']);
  assert.equal(r.grant_type, 'authorization_code');
  assert.equal(r.code, 'the-code');
  assert.equal(r.redirect_uri, `${BASE}/`);
  const { createHash } = await import('node:crypto');
  assert.equal(createHash('sha256').update(r.code_verifier).digest('base64url'), a.code_challenge, 'S256(verifier) = challenge');
  assert.equal(oidc.url(), `${BASE}/`, 'the code is cleaned from the address');
  assert.equal(await oidc.evaluate(() => sessionStorage.getItem('portcullis.token')), 'demo-alice');
  // A forged return (state not started here) is refused.
  await oidc.getByRole('button', { name: 'Sign out' }).click();
  await oidc.goto(`${BASE}/?code=other&state=forged`);
  await oidc.locator('#msg', { hasText: '(state_mismatch' }).waitFor();
  assert.equal(await oidc.getByLabel('API key').isVisible(), true);
  step('OIDC code flow with PKCE S256; forged state refused');

  // Sign out empties the session.
  await alice.getByRole('button', { name: 'Sign out' }).click();
  await alice.getByLabel('API key').waitFor();
  assert.equal(await alice.evaluate(() => sessionStorage.length), 0);

  assert.deepEqual(problems, [], 'no CSP violation or script error on the pages');
  step('passed');
} finally {
  await browser.close();
}
