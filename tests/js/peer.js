#!/usr/bin/env node
// A JS hypercore 11 peer for multifeed's interop tests (driven by tests/js_interop.rs).
//
//   node peer.js serve-writer <dir> <port|0> <count>
//     Creates a compat core (key = ed25519 public key, which is what Rust hypercore 0.16
//     verifies) with a fresh key pair, appends `js-entry-<i>` for i in 0..count, prints
//     `KEY <hex>`, listens on 127.0.0.1 and prints `PORT <n>`. Replicates the first
//     incoming socket as the Noise responder (the TCP client initiates), prints `CLOSED`
//     when that socket closes and exits 0.
//
//   node peer.js download <port> <keyhex> <count> <dir>
//     Connects to 127.0.0.1:<port> as the Noise initiator, opens a read-only core for
//     <keyhex>, waits until it has <count> blocks and every block is downloaded, prints
//     `BLOCK <i> <hex>` for each block and then `DONE`. It then lingers until the other
//     side closes the connection (so the peer sees what we downloaded) and exits 0.
//
// Every failure, and running longer than 30 s in all, exits non-zero with a message on
// stderr. Only stdout lines starting with a keyword are protocol; stderr is diagnostics.

'use strict'

const net = require('net')
const Hypercore = require('hypercore')
const crypto = require('hypercore-crypto')

const OVERALL_TIMEOUT_MS = 30_000
const LINGER_MS = 10_000
const HOST = '127.0.0.1'

function fail(message) {
  process.stderr.write(`peer.js: ${message}\n`)
  process.exit(1)
}

process.on('uncaughtException', (err) => fail(`uncaught exception: ${err && err.stack}`))
process.on('unhandledRejection', (err) => fail(`unhandled rejection: ${err && err.stack}`))
setTimeout(() => fail(`timed out after ${OVERALL_TIMEOUT_MS} ms`), OVERALL_TIMEOUT_MS)

function out(line) {
  process.stdout.write(line + '\n')
}

function log(line) {
  process.stderr.write(`peer.js: ${line}\n`)
}

function parseCount(text, what) {
  const n = Number(text)
  if (!Number.isSafeInteger(n) || n < 0) fail(`bad ${what}: ${text}`)
  return n
}

// Resolves when `cond()` holds, re-checking on each `event` of `emitter`.
function waitUntil(emitter, event, cond) {
  return new Promise((resolve) => {
    const check = () => {
      if (!cond()) return
      emitter.off(event, check)
      resolve()
    }
    emitter.on(event, check)
    check()
  })
}

function pipeReplication(core, socket, isInitiator, label) {
  const started = Date.now()
  core.on('peer-add', () => log(`${label}: channel open (+${Date.now() - started} ms)`))
  core.on('peer-remove', () => log(`${label}: channel closed (+${Date.now() - started} ms)`))
  socket.on('close', () => log(`${label}: socket closed (+${Date.now() - started} ms)`))
  const stream = core.replicate(isInitiator)
  socket.on('error', (err) => log(`${label} socket error: ${err.message}`))
  stream.on('error', (err) => log(`${label} replication stream error: ${err.message}`))
  socket.pipe(stream).pipe(socket)
  return stream
}

async function serveWriter(dir, port, count) {
  const keyPair = crypto.keyPair()
  const core = new Hypercore(dir, keyPair.publicKey, { keyPair })
  await core.ready()
  if (!core.writable) fail('the writer core is not writable')
  const blocks = []
  for (let i = 0; i < count; i++) blocks.push(Buffer.from(`js-entry-${i}`))
  if (blocks.length) await core.append(blocks)
  if (core.length !== count) fail(`appended ${core.length} blocks, expected ${count}`)
  if (!core.key.equals(keyPair.publicKey)) fail('the core is not a compat core')
  out(`KEY ${core.key.toString('hex')}`)

  let uploaded = 0
  core.on('upload', () => {
    uploaded++
  })

  let served = false
  const server = net.createServer((socket) => {
    if (served) {
      socket.destroy()
      return
    }
    served = true
    server.close()
    pipeReplication(core, socket, false, 'server')
    socket.on('close', async () => {
      out(`CLOSED uploaded=${uploaded}`)
      await core.close()
      process.exit(0)
    })
  })
  server.on('error', (err) => fail(`listen: ${err.message}`))
  server.listen(port, HOST, () => out(`PORT ${server.address().port}`))
}

async function download(port, keyHex, count, dir) {
  if (!/^[0-9a-f]{64}$/i.test(keyHex)) fail(`bad key: ${keyHex}`)
  const core = new Hypercore(dir, Buffer.from(keyHex, 'hex'))
  await core.ready()
  if (core.writable) fail('the downloading core must be read-only')

  const socket = net.connect(port, HOST)
  let done = false
  let socketClosed = false
  const closed = new Promise((resolve) =>
    socket.on('close', () => {
      socketClosed = true
      resolve()
    })
  )
  socket.on('close', () => {
    if (!done) fail(`the connection closed after ${core.length}/${count} blocks`)
  })
  pipeReplication(core, socket, true, 'client')

  await waitUntil(core, 'append', () => core.length >= count)
  if (core.length !== count) fail(`the core has ${core.length} blocks, expected ${count}`)
  if (count > 0) await core.download({ start: 0, end: count }).done()
  const blocks = []
  for (let i = 0; i < count; i++) {
    const block = await core.get(i, { wait: true, timeout: OVERALL_TIMEOUT_MS })
    if (!block) fail(`block ${i} is missing`)
    blocks.push(block)
  }
  if (core.contiguousLength !== count) {
    fail(`contiguous length ${core.contiguousLength}, expected ${count}`)
  }
  for (let i = 0; i < count; i++) out(`BLOCK ${i} ${blocks[i].toString('hex')}`)
  done = true
  out('DONE')

  // Linger so the other side learns we hold everything and ends the session itself.
  let lingerTimer = null
  await Promise.race([
    closed,
    new Promise((resolve) => {
      lingerTimer = setTimeout(resolve, LINGER_MS)
    })
  ])
  clearTimeout(lingerTimer)
  if (!socketClosed) log(`the other side kept the connection open for ${LINGER_MS} ms after DONE`)
  socket.destroy()
  await core.close()
  process.exit(0)
}

const [mode, ...args] = process.argv.slice(2)
if (mode === 'serve-writer' && args.length === 3) {
  serveWriter(args[0], parseCount(args[1], 'port'), parseCount(args[2], 'count'))
} else if (mode === 'download' && args.length === 4) {
  download(parseCount(args[0], 'port'), args[1], parseCount(args[2], 'count'), args[3])
} else {
  fail(
    'usage: peer.js serve-writer <dir> <port|0> <count> | download <port> <keyhex> <count> <dir>'
  )
}
