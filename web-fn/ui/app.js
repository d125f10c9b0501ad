// portcullis: the self-service page. Plain JavaScript, no dependencies, nothing inline (the
// page's Content-Security-Policy allows only this file): every element is built with the DOM,
// never from HTML strings.
'use strict';
(function () {
  const TOKEN = 'portcullis.token';
  const OIDC = 'portcullis.oidc';
  const POLL_MS = 5000;
  const OPEN = ['pending', 'approved', 'active', 'revoking'];
  const $ = (id) => document.getElementById(id);
  const store = window.sessionStorage;

  let me = null;
  let policies = [];
  let poller = 0;
  let busy = false;

  // ---------- small helpers ----------

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'text') el.textContent = v;
      else if (k === 'class') el.className = v;
      else el.setAttribute(k, v === true ? '' : v);
    }
    for (const c of children.flat(Infinity)) if (c !== null && c !== undefined && c !== false) el.append(c);
    return el;
  }

  function show(id, on) { $(id).hidden = !on; }

  let msgTimer = 0;
  function notify(text, kind) {
    const m = $('msg');
    clearTimeout(msgTimer);
    m.className = 'msg ' + (kind || 'info');
    m.replaceChildren(h('span', { text }), h('button', { type: 'button', class: 'close', 'aria-label': 'Dismiss message', text: '×' }));
    m.hidden = false;
    if (kind !== 'error') msgTimer = setTimeout(() => { m.hidden = true; }, 8000);
  }

  function fail(err) {
    if (err && err.code) notify(err.message + ' (' + err.code + (err.status ? ', HTTP ' + err.status : '') + ')', 'error');
    else notify(String((err && err.message) || err), 'error');
  }

  // ISO 8601 durations (P[nD][T[nH][nM][nS]]) <-> minutes.
  function toMinutes(iso) {
    const m = /^P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)S)?)?$/.exec(iso || '');
    if (!m) return 0;
    return (+m[1] || 0) * 1440 + (+m[2] || 0) * 60 + (+m[3] || 0) + Math.floor((+m[4] || 0) / 60);
  }
  function toIso(min) {
    const hh = Math.floor(min / 60), mm = min % 60;
    return 'PT' + (hh ? hh + 'H' : '') + (mm || !hh ? mm + 'M' : '');
  }
  function human(min) {
    const hh = Math.floor(min / 60), mm = min % 60;
    if (!hh) return mm + ' min';
    return hh + ' h' + (mm ? ' ' + mm + ' min' : '');
  }
  function humanIso(iso) { const m = toMinutes(iso); return m ? human(m) : iso; }

  function left(ends) {
    let s = Math.floor((Date.parse(ends) - Date.now()) / 1000);
    if (!(s > 0)) return 'ending now…';
    const hh = Math.floor(s / 3600); s -= hh * 3600;
    const mm = Math.floor(s / 60); s -= mm * 60;
    return (hh ? hh + ' h ' : '') + (hh || mm ? mm + ' min ' : '') + s + ' s left';
  }

  function when(t) {
    const d = new Date(t);
    if (isNaN(d)) return t;
    const same = d.toDateString() === new Date().toDateString();
    return same ? d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' })
      : d.toLocaleString([], { month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit' });
  }

  function b64url(bytes) {
    let s = '';
    for (const b of bytes) s += String.fromCharCode(b);
    return btoa(s).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
  }
  const random = (n) => b64url(crypto.getRandomValues(new Uint8Array(n)));

  // ---------- the API ----------

  async function api(method, path, body) {
    const token = store.getItem(TOKEN);
    const headers = { Accept: 'application/json' };
    if (token) headers.Authorization = 'Bearer ' + token;
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    let res;
    try {
      res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), cache: 'no-store', credentials: 'omit' });
    } catch (e) {
      throw { code: 'network_error', message: 'The service cannot be reached' };
    }
    let data = null;
    try { data = await res.json(); } catch (e) { /* not JSON */ }
    if (res.ok) return data;
    const err = (data && data.error) || { code: 'http_' + res.status, message: res.statusText || 'Request failed' };
    err.status = res.status;
    if (res.status === 401) {
      err.message = (me ? 'Signed out: ' : 'Sign-in refused: ') + err.message;
      signOut(false);
    }
    throw err;
  }

  // ---------- sign-in ----------

  async function startOidc(cfg) {
    const verifier = random(32);
    const digest = await crypto.subtle.digest('SHA-256', new TextEncoder().encode(verifier));
    const state = random(16), nonce = random(16);
    store.setItem(OIDC, JSON.stringify({ verifier, state, nonce, cfg }));
    const u = new URL(cfg.authorize_url);
    const q = {
      response_type: 'code', client_id: cfg.client_id, redirect_uri: cfg.redirect_uri, scope: cfg.scope,
      state, nonce, code_challenge: b64url(new Uint8Array(digest)), code_challenge_method: 'S256',
    };
    for (const [k, v] of Object.entries(q)) u.searchParams.set(k, v);
    window.location.assign(u.toString());
  }

  function claims(jwt) {
    try {
      const p = jwt.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
      return JSON.parse(new TextDecoder().decode(Uint8Array.from(atob(p), (ch) => ch.charCodeAt(0))));
    } catch (e) { return null; }
  }

  // Back from the provider with ?code&state (or ?error): redeem the code in the browser.
  async function finishOidc(params) {
    const saved = JSON.parse(store.getItem(OIDC) || 'null');
    store.removeItem(OIDC);
    history.replaceState(null, '', window.location.pathname);
    // Nothing the URL says is shown unless this page started that sign-in.
    if (!saved || !params.get('state') || params.get('state') !== saved.state) {
      throw { code: 'state_mismatch', message: 'This sign-in was not started here; try again' };
    }
    if (params.get('error')) {
      throw { code: params.get('error'), message: params.get('error_description') || 'The sign-in was refused' };
    }
    const cfg = saved.cfg;
    let res;
    try {
      res = await fetch(cfg.token_url, {
        method: 'POST',
        headers: { 'Content-Type': 'application/x-www-form-urlencoded' },
        body: new URLSearchParams({
          grant_type: 'authorization_code', code: params.get('code'), redirect_uri: cfg.redirect_uri,
          client_id: cfg.client_id, code_verifier: saved.verifier,
        }),
        credentials: 'omit',
      });
    } catch (e) {
      throw { code: 'network_error', message: 'The identity provider cannot be reached' };
    }
    const data = await res.json().catch(() => ({}));
    if (!res.ok || !data.access_token) {
      throw { code: data.error || 'token_error', message: data.error_description || 'The code could not be redeemed' };
    }
    if (data.id_token) {
      const c = claims(data.id_token);
      if (!c || c.nonce !== saved.nonce) throw { code: 'nonce_mismatch', message: 'The sign-in answer was not for this page' };
    }
    store.setItem(TOKEN, data.access_token);
  }

  // `say`: the person pressed Sign out (everything goes). Otherwise the token was refused
  // (expired, revoked): it goes, and a half-typed request stays for after signing in again.
  function signOut(say) {
    clearInterval(poller);
    poller = 0;
    me = null;
    store.clear();
    if (say) $('request-form').reset();
    $('mine-list').replaceChildren();
    $('inbox-list').replaceChildren();
    for (const id of ['who', 'request', 'inbox', 'mine', 'loading']) show(id, false);
    show('sign-in', true);
    if (say) notify('Signed out.', 'info');
  }

  // ---------- after sign-in ----------

  async function enter() {
    me = await api('GET', '/api/whoami');
    const roles = me.roles || [];
    $('who-name').textContent = me.display_name ? me.display_name + ' (' + me.principal + ')' : me.principal;
    $('who-roles').textContent = [roles.join(', ') || 'no role', (me.groups || []).length ? 'groups ' + me.groups.join(', ') : '', me.address ? 'from ' + me.address : '']
      .filter(Boolean).join(' · ');
    show('sign-in', false);
    show('loading', false);
    show('msg', false);
    show('who', true);
    const requester = roles.includes('requester');
    const approver = roles.includes('approver') || roles.includes('admin');
    show('request', requester);
    show('mine', requester);
    show('inbox', approver);
    if (requester) {
      const a = me.address || '';
      $('source').value = a ? a + (a.includes(':') ? '/128' : '/32') : '';
      $('source').placeholder = a ? '' : 'your address';
      await loadPolicies();
    }
    await refresh();
    clearInterval(poller);
    poller = setInterval(refresh, POLL_MS);
    $('main').focus();
  }

  async function loadPolicies() {
    const data = await api('GET', '/api/policies');
    policies = (data.policies || []).filter((p) => p.enabled !== false);
    const sel = $('policy');
    const was = sel.value;
    sel.replaceChildren(...policies.map((p) => h('option', { value: p.name, text: p.name })));
    if (policies.some((p) => p.name === was)) sel.value = was;
    show('request-form', policies.length > 0);
    show('no-policies', policies.length === 0);
    policyChanged();
  }

  function currentPolicy() { return policies.find((p) => p.name === $('policy').value); }

  function policyChanged() {
    const p = currentPolicy();
    const list = $('port-list');
    if (!p) { list.replaceChildren(); return; }
    const vms = p.vms || [];
    const name = (vm) => vm.vm.split('/').pop();
    $('policy-vm').textContent = (vms.length === 1 ? name(vms[0]) + ' · ' + vms[0].private_ip : vms.length + ' VMs') +
      (p.approval && p.approval.mode === 'auto' ? ' · approved automatically' : ' · needs approval');
    // A policy over several VMs: the requester picks which.
    show('vms', vms.length > 1);
    $('vm-list').replaceChildren(...(vms.length > 1 ? vms : []).map((vm, i) => {
      const id = 'vm-' + i;
      return h('div', { class: 'check' },
        h('input', { type: 'checkbox', id, name: 'vm', value: vm.vm }),
        h('label', { for: id, text: name(vm) + ' (' + vm.private_ip + ')' }));
    }));
    list.replaceChildren(...p.ports.map((r, i) => {
      const id = 'port-' + i;
      return h('div', { class: 'check' },
        h('input', { type: 'checkbox', id, name: 'port', value: String(r.port), checked: p.ports.length === 1 }),
        h('label', { for: id, text: r.port + '/' + (r.protocol === '*' ? 'any' : r.protocol) + ' (up to ' + humanIso(r.max_duration) + ')' }));
    }));
    portsChanged();
  }

  function chosenPorts() {
    return [...$('port-list').querySelectorAll('input:checked')].map((c) => Number(c.value));
  }

  function portsChanged() {
    const p = currentPolicy();
    if (!p) return;
    const chosen = chosenPorts();
    const rules = p.ports.filter((r) => !chosen.length || chosen.includes(r.port));
    const max = Math.min(...rules.map((r) => toMinutes(r.max_duration) || 180));
    const sel = $('duration');
    const was = Number(sel.value) || 60;
    const opts = [15, 30, 60, 120, 180, 240, 480, 720, 1440].filter((m) => m < max);
    opts.push(max);
    sel.replaceChildren(...opts.map((m) => h('option', { value: String(m), text: human(m) })));
    sel.value = String(opts.includes(was) ? was : opts.filter((m) => m <= was).pop() || opts[0]);
    const sources = [...new Set(rules.flatMap((r) => r.allowed_sources || []))];
    $('source-hint').textContent = sources.length ? 'Allowed sources: ' + sources.join(', ') : 'Any source the policy allows; leave empty for your own address.';
  }

  async function submitRequest(ev) {
    ev.preventDefault();
    const ports = chosenPorts();
    const justification = $('justification').value.trim();
    if (!ports.length) { notify('Choose at least one port.', 'error'); $('port-list').querySelector('input').focus(); return; }
    if (!justification) { notify('Say why you need access (justification).', 'error'); $('justification').focus(); return; }
    const vms = [...$('vm-list').querySelectorAll('input:checked')].map((c) => c.value);
    if (!$('vms').hidden && !vms.length) { notify('Choose at least one VM.', 'error'); $('vm-list').querySelector('input').focus(); return; }
    const body = { policy: $('policy').value, ports, duration: toIso(Number($('duration').value)), justification };
    if (vms.length) body.vms = vms;
    const source = $('source').value.trim();
    if (source) body.source = source;
    const btn = $('request-submit');
    btn.disabled = true;
    try {
      const r = await api('POST', '/api/requests', body);
      $('justification').value = '';
      notify('Request ' + r.id + ' is ' + stateText(r) + '.', 'ok');
      await refresh();
    } catch (e) { fail(e); } finally { btn.disabled = false; }
  }

  // ---------- lists ----------

  function stateText(r) {
    if (r.state === 'pending') return 'waiting for approval';
    if (r.state === 'revoking') return 'closing';
    return r.state.replace('_', ' ');
  }

  function facts(pairs) {
    return h('dl', { class: 'facts' }, pairs.filter((p) => p[1]).map(([k, v]) => [h('dt', { text: k }), h('dd', { text: v })]));
  }

  function portsText(r) { return r.ports.join(', ') + '/' + (r.protocol === '*' ? 'any' : r.protocol); }

  function mineCard(r) {
    const open = OPEN.includes(r.state);
    const li = h('li', { class: 'item state-' + r.state + (open ? '' : ' closed') });
    li.append(h('div', { class: 'item-head' },
      h('strong', { text: r.policy + ' · ' + portsText(r) }),
      h('span', { class: 'badge ' + r.state, text: stateText(r) })));
    if (r.state === 'active' && r.ends_at) {
      li.append(h('p', { class: 'countdown', 'data-ends': r.ends_at, text: left(r.ends_at) }));
    }
    li.append(facts([
      ['From', r.source], ['For', humanIso(r.duration)],
      ['Ends', r.ends_at ? when(r.ends_at) : ''],
      ['Asked', when(r.created_at)],
      ['Why', r.justification],
      ['Approved by', (r.approvals || []).map((a) => a.by + (a.comment ? ' (“' + a.comment + '”)' : '')).join(', ')],
      ['Closed', r.ended ? r.ended.by + (r.ended.reason ? ': ' + r.ended.reason : '') : ''],
      ['Problem', r.last_error || ''],
    ]));
    const actions = h('div', { class: 'actions' });
    if (r.state === 'active') {
      const sid = 'extend-' + r.id;
      actions.append(
        h('label', { for: sid, class: 'inline', text: 'Extend by' }),
        h('select', { id: sid, name: 'extend' }, [15, 30, 60].map((m) => h('option', { value: String(m), text: human(m), selected: m === 30 }))),
        h('button', { type: 'button', class: 'secondary', 'data-act': 'extend', 'data-id': r.id, text: 'Extend' }),
        h('button', { type: 'button', class: 'danger', 'data-act': 'revoke', 'data-id': r.id, text: 'Revoke' }));
    } else if (r.state === 'pending') {
      actions.append(h('button', { type: 'button', class: 'secondary', 'data-act': 'cancel', 'data-id': r.id, text: 'Cancel request' }));
    }
    if (actions.childNodes.length) li.append(actions);
    return li;
  }

  function inboxCard(r) {
    const li = h('li', { class: 'item state-pending' });
    const who = r.requester_name ? r.requester_name + ' (' + r.requester + ')' : r.requester;
    li.append(h('div', { class: 'item-head' },
      h('strong', { text: who + ' → ' + r.policy }),
      h('span', { class: 'badge pending', text: 'pending' })));
    li.append(facts([
      ['Ports', portsText(r)], ['For', humanIso(r.duration)], ['From', r.source],
      ['Why', r.justification],
      ['Groups', (r.requester_groups || []).join(', ')],
      ['Asked', when(r.created_at)],
      ['Expires', r.pending_until ? when(r.pending_until) : ''],
      ['Approvals', (r.approvals || []).map((a) => a.by).join(', ')],
    ]));
    const nid = 'note-' + r.id;
    li.append(h('div', { class: 'actions' },
      h('label', { for: nid, class: 'inline', text: 'Comment or reason' }),
      h('input', { id: nid, name: 'note', type: 'text', maxlength: '500', autocomplete: 'off' }),
      h('button', { type: 'button', 'data-act': 'approve', 'data-id': r.id, text: 'Approve',
        'aria-label': 'Approve request ' + r.id + ' by ' + r.requester }),
      h('button', { type: 'button', class: 'danger', 'data-act': 'deny', 'data-id': r.id, text: 'Deny',
        'aria-label': 'Deny request ' + r.id + ' by ' + r.requester })));
    return li;
  }

  // Updates a list in place, keyed by request id: unchanged cards (and any text typed in
  // them, and the focus) stay as they are across polls.
  function render(list, items, card) {
    const old = new Map([...list.children].map((li) => [li.dataset.id, li]));
    items.forEach((r, i) => {
      const sig = JSON.stringify(r);
      let li = old.get(r.id);
      if (!li || li.sig !== sig) {
        const fresh = card(r);
        fresh.dataset.id = r.id;
        fresh.sig = sig;
        if (li) {
          for (const input of li.querySelectorAll('input[type=text],select')) {
            const twin = fresh.querySelector('[name="' + input.name + '"]');
            if (twin) twin.value = input.value;
          }
          li.replaceWith(fresh);
        }
        li = fresh;
      }
      old.delete(r.id);
      if (list.children[i] !== li) list.insertBefore(li, list.children[i] || null);
    });
    for (const li of old.values()) li.remove();
  }

  async function refresh() {
    if (!me || busy) return;
    busy = true;
    try {
      const roles = me.roles || [];
      const jobs = [api('GET', '/api/requests?mine=true')];
      const inbox = roles.includes('approver') || roles.includes('admin');
      if (inbox) jobs.push(api('GET', '/api/requests?awaiting=me'));
      const [mine, waiting] = await Promise.all(jobs);
      if (!me) return;
      const all = mine.requests || [];
      const shown = all.filter((r) => OPEN.includes(r.state)).concat(all.filter((r) => !OPEN.includes(r.state)).slice(0, 5));
      render($('mine-list'), shown, mineCard);
      show('mine-empty', shown.length === 0);
      if (shown.length) show('mine', true);
      if (inbox) {
        const items = waiting.requests || [];
        render($('inbox-list'), items, inboxCard);
        show('inbox-empty', items.length === 0);
        $('inbox-count').textContent = items.length ? '(' + items.length + ')' : '';
      }
    } catch (e) {
      fail(e);
    } finally {
      busy = false;
    }
  }

  async function act(btn) {
    const id = btn.dataset.id, what = btn.dataset.act;
    const li = btn.closest('li');
    let body = {};
    if (what === 'extend') body = { duration: toIso(Number(li.querySelector('[name=extend]').value)) };
    if (what === 'approve' || what === 'deny') {
      const note = li.querySelector('[name=note]').value.trim();
      if (note) body = what === 'approve' ? { comment: note } : { reason: note };
    }
    for (const b of li.querySelectorAll('button')) b.disabled = true;
    try {
      const r = await api('POST', '/api/requests/' + encodeURIComponent(id) + '/' + what, body);
      const done = { approve: 'approved', deny: 'denied', revoke: 'revoked', cancel: 'cancelled', extend: 'extended' }[what];
      notify('Request ' + id + ' ' + done + (r.state && done !== r.state ? '; it is now ' + stateText(r) : '') + '.', 'ok');
    } catch (e) {
      fail(e);
    } finally {
      for (const b of li.querySelectorAll('button')) b.disabled = false;
    }
    // A poll may be under way: wait for it, then show the change at once.
    while (busy) await new Promise((ok) => setTimeout(ok, 50));
    await refresh();
  }

  function tick() {
    for (const el of document.querySelectorAll('[data-ends]')) el.textContent = left(el.dataset.ends);
  }

  // ---------- start ----------

  async function start() {
    $('sign-out').addEventListener('click', () => signOut(true));
    $('msg').addEventListener('click', (e) => { if (e.target.closest('.close')) $('msg').hidden = true; });
    $('policy').addEventListener('change', policyChanged);
    $('port-list').addEventListener('change', portsChanged);
    $('request-form').addEventListener('submit', submitRequest);
    for (const list of ['mine-list', 'inbox-list']) {
      $(list).addEventListener('click', (e) => {
        const b = e.target.closest('button[data-act]');
        if (b && !b.disabled) act(b);
      });
    }
    $('key-form').addEventListener('submit', async (e) => {
      e.preventDefault();
      const key = $('api-key').value.trim();
      if (!key) { $('api-key').focus(); return; }
      store.setItem(TOKEN, key);
      $('api-key').value = '';
      try { await enter(); } catch (err) { fail(err); if (!me) signOut(false); }
    });
    setInterval(tick, 1000);

    let cfg = null;
    try {
      const r = await fetch('/ui/config.json', { cache: 'no-store' });
      cfg = (await r.json()).oidc;
    } catch (e) { /* API keys still work */ }
    if (cfg) {
      show('oidc', true);
      $('oidc-go').addEventListener('click', () => startOidc(cfg).catch(fail));
    }
    const params = new URLSearchParams(window.location.search);
    try {
      if (params.has('code') || params.has('error')) await finishOidc(params);
      if (store.getItem(TOKEN)) { await enter(); return; }
    } catch (e) {
      fail(e);
      if (me) return;
      // A rate limit or an unreachable service is no reason to forget a good token: the page
      // tries again on reload.
      if (store.getItem(TOKEN) && e && e.status !== 401) return;
    }
    signOut(false);
  }

  start();
})();
