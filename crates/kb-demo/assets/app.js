// kb-demo page: a chat-style keyword page talking to kb-serve through this server's /api proxy.
(function () {
  'use strict';

  /** The original Streamlit page's message for any failure. */
  var ERROR_MESSAGE = '현재 문제가 발생했습니다. 잠시후 다시 시도해 주세요. 문제가 계속되는 경우 관리자에게 연락바랍니다.';
  var STORAGE_KEY = 'kb-demo.history.v1';
  var MAX_HISTORY = 200;
  var READY_POLL_MS = 5000;

  var log = document.getElementById('log');
  var form = document.getElementById('form');
  var input = document.getElementById('prompt');
  var sendButton = document.getElementById('send');
  var resetButton = document.getElementById('reset');
  var pending = document.getElementById('pending');
  var statusBox = document.getElementById('status');
  var statusText = document.getElementById('status-text');

  var history = loadHistory();
  var busy = false;

  // ---- history (localStorage) ----

  function validEntry(e) {
    return e && typeof e === 'object' && typeof e.query === 'string';
  }

  function loadHistory() {
    try {
      var v = JSON.parse(window.localStorage.getItem(STORAGE_KEY) || '[]');
      return Array.isArray(v) ? v.filter(validEntry).slice(-MAX_HISTORY) : [];
    } catch (_) {
      return [];
    }
  }

  function saveHistory() {
    try {
      if (history.length) {
        window.localStorage.setItem(STORAGE_KEY, JSON.stringify(history.slice(-MAX_HISTORY)));
      } else {
        window.localStorage.removeItem(STORAGE_KEY);
      }
    } catch (_) {
      // Storage full or disabled: the conversation still works, it just is not kept.
    }
  }

  // ---- rendering (textContent only: model output and questions are never parsed as HTML) ----

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function avatar(who) {
    var a = el('span', 'avatar', who === 'user' ? '나' : 'KB');
    a.setAttribute('aria-hidden', 'true');
    return a;
  }

  function formatMs(ms) {
    if (typeof ms !== 'number' || !isFinite(ms)) return null;
    return ms >= 1000 ? (ms / 1000).toFixed(2) + '초' : Math.round(ms) + 'ms';
  }

  function userMessage(entry) {
    var li = el('li', 'msg user');
    li.appendChild(avatar('user'));
    var bubble = el('div', 'bubble');
    var label = el('span', 'visually-hidden', '질문: ');
    bubble.appendChild(label);
    bubble.appendChild(el('p', 'query', entry.query));
    li.appendChild(bubble);
    return li;
  }

  function answerMessage(entry) {
    var li = el('li', 'msg assistant answer');
    li.appendChild(avatar('assistant'));
    var bubble = el('div', 'bubble');
    if (entry.error) {
      li.classList.add('error');
      bubble.appendChild(el('p', 'error-message', ERROR_MESSAGE));
      bubble.appendChild(el('p', 'error-detail', entry.error));
      li.appendChild(bubble);
      return li;
    }
    var keywords = Array.isArray(entry.keywords) ? entry.keywords : [];
    var head = el('div', 'answer-head');
    head.appendChild(el('span', 'answer-title', '추출된 키워드'));
    var copy = el('button', 'button ghost copy', '복사');
    copy.type = 'button';
    copy.setAttribute('aria-label', '키워드 복사');
    copy.addEventListener('click', function () { copyKeywords(copy, keywords); });
    if (!keywords.length) copy.disabled = true;
    head.appendChild(copy);
    bubble.appendChild(head);

    if (keywords.length) {
      var tags = el('ul', 'tags');
      tags.setAttribute('aria-label', '키워드 ' + keywords.length + '개');
      keywords.forEach(function (k) { tags.appendChild(el('li', 'tag', String(k))); });
      bubble.appendChild(tags);
    } else {
      bubble.appendChild(el('p', 'empty', '추출된 키워드가 없습니다.'));
    }

    var raw = el('p', 'raw');
    raw.appendChild(el('span', 'raw-label', '모델 출력'));
    raw.appendChild(el('code', 'raw-text', typeof entry.text === 'string' ? entry.text : ''));
    bubble.appendChild(raw);

    var parts = [];
    var total = formatMs(entry.latencyMs);
    var server = formatMs(entry.serverMs);
    if (total) parts.push('응답 시간 ' + total);
    if (server) parts.push('서버 처리 ' + server);
    if (parts.length) bubble.appendChild(el('p', 'meta latency', parts.join(' · ')));
    li.appendChild(bubble);
    return li;
  }

  function render() {
    while (log.children.length > 1) log.removeChild(log.lastChild);
    history.forEach(function (entry) {
      log.appendChild(userMessage(entry));
      if (entry.done !== false) log.appendChild(answerMessage(entry));
    });
    resetButton.disabled = history.length === 0 || busy;
  }

  function scrollToEnd() {
    var last = pending.hidden ? log.lastElementChild : pending;
    if (last && last.scrollIntoView) last.scrollIntoView({ block: 'end' });
  }

  // ---- copy ----

  function copyKeywords(button, keywords) {
    var text = keywords.join(', ');
    var done = function (ok) {
      button.textContent = ok ? '복사됨' : '복사 실패';
      button.classList.toggle('copied', ok);
      window.setTimeout(function () {
        button.textContent = '복사';
        button.classList.remove('copied');
      }, 1500);
    };
    var fallback = function () {
      var area = el('textarea');
      area.value = text;
      area.setAttribute('readonly', '');
      area.className = 'visually-hidden';
      document.body.appendChild(area);
      area.select();
      var ok = false;
      try { ok = document.execCommand('copy'); } catch (_) { ok = false; }
      document.body.removeChild(area);
      button.focus();
      done(ok);
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(function () { done(true); }, fallback);
    } else {
      fallback();
    }
  }

  // ---- sending ----

  function setBusy(on) {
    busy = on;
    pending.hidden = !on;
    sendButton.disabled = on;
    log.setAttribute('aria-busy', on ? 'true' : 'false');
  }

  function send() {
    var query = input.value.trim();
    if (!query || busy) return;
    var entry = { query: query, at: new Date().toISOString(), done: false };
    history.push(entry);
    saveHistory(); // the question survives a reload even before its answer comes
    input.value = '';
    autosize();
    setBusy(true);
    render();
    scrollToEnd();
    var started = performance.now();
    fetch('/api/keywords', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ query: query })
    }).then(function (resp) {
      return resp.json().then(
        function (body) { return { resp: resp, body: body }; },
        function () { return { resp: resp, body: null }; }
      );
    }).then(function (r) {
      var result = r.body && Array.isArray(r.body.results) ? r.body.results[0] : null;
      if (!r.resp.ok || !result) {
        entry.error = (r.body && typeof r.body.error === 'string' && r.body.error) || ('HTTP ' + r.resp.status);
      } else {
        entry.keywords = Array.isArray(result.keywords) ? result.keywords.map(String) : [];
        entry.text = typeof result.text === 'string' ? result.text : '';
        entry.serverMs = typeof r.body.elapsed_ms === 'number' ? r.body.elapsed_ms : undefined;
      }
    }, function () {
      entry.error = '데모 서버에 연결할 수 없습니다.';
    }).then(function () {
      entry.latencyMs = Math.round(performance.now() - started);
      delete entry.done;
      saveHistory();
      setBusy(false);
      render();
      scrollToEnd();
      if (entry.error) checkReady();
      input.focus();
    });
  }

  form.addEventListener('submit', function (event) {
    event.preventDefault();
    send();
  });

  input.addEventListener('keydown', function (event) {
    if (event.key !== 'Enter' || event.shiftKey) return;
    // A Korean IME is still composing: this Enter only commits the syllable, never sends it.
    if (event.isComposing || event.keyCode === 229) return;
    event.preventDefault();
    send();
  });

  function autosize() {
    input.style.height = 'auto';
    input.style.height = Math.min(input.scrollHeight, 200) + 'px';
  }
  input.addEventListener('input', autosize);

  resetButton.addEventListener('click', function () {
    if (busy) return;
    history = [];
    saveHistory();
    render();
    input.focus();
  });

  // ---- server status ----

  var STATES = {
    ready: '서버 준비됨',
    loading: '모델 준비 중',
    offline: '서버 연결 안 됨',
    checking: '서버 확인 중…'
  };

  function showStatus(state, detail) {
    statusBox.setAttribute('data-state', state);
    statusText.textContent = STATES[state];
    statusBox.title = detail || '';
  }

  function checkReady() {
    return fetch('/api/ready', { cache: 'no-store' }).then(function (resp) {
      return resp.json().catch(function () { return {}; }).then(function (body) {
        if (resp.ok && body.ready) {
          showStatus('ready', body.model ? '모델: ' + body.model : '');
        } else if (resp.status === 503) {
          showStatus('loading', body.error);
        } else {
          showStatus('offline', body.error);
        }
      });
    }, function () {
      showStatus('offline', '데모 서버에 연결할 수 없습니다.');
    });
  }

  // A request interrupted by a reload or a closed tab has no answer: show it as failed.
  history.forEach(function (e) {
    if (e.done === false) { delete e.done; e.error = '요청이 완료되지 않았습니다.'; }
  });
  saveHistory();
  render();
  scrollToEnd();
  checkReady();
  window.setInterval(function () { if (!document.hidden) checkReady(); }, READY_POLL_MS);
  document.addEventListener('visibilitychange', function () { if (!document.hidden) checkReady(); });
  input.focus();
})();
