// The compiled load engine behind scripts/loadtest.py: one worker process.
//
// It does what a Python worker (scripts/loadgen/worker.py) does, for the
// multichat protocol and the fanout, rooms, connect and idle scenarios,
// and speaks the same phase protocol with the parent (run.py) as JSON
// lines: the plan on the first line of stdin, then the commands
// ["connect"], ["prepare"], ["run", start, deadline] and ["finish"]; it
// answers on stdout with ["setup", open, errors], ["done", phase, open,
// errors], ["sample", k, {...}], ["ran", {...}] and ["final", {...}]
// (scripts/loadgen/engine.py turns them into the worker's tuples).
//
// It is built so that it is never the limit: one thread (GOMAXPROCS=1)
// runs one loop over a private epoll on raw non-blocking sockets; a
// wake-up serves every socket with data, one read(2) each; frames are
// counted from their headers and a chat message's send time is read by a
// byte search for the "~lt" marker (no JSON is decoded); latencies go
// into the same log-linear histogram as histogram.py's. Times are
// CLOCK_MONOTONIC nanoseconds, the clock of Python's time.monotonic_ns(),
// so latencies are end to end across processes.
//
// Linux only. Built by scripts/loadgen/gobuild.py (standard library only).
package main

import (
	"bufio"
	"bytes"
	"crypto/sha1"
	"crypto/tls"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"math/rand"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unsafe"
)

var mark = []byte("~lt")

const wsGUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

// ---------------------------------------------------------------------------
// The clock: CLOCK_MONOTONIC nanoseconds, read once by syscall and then
// followed with Go's monotonic clock (the same clock, through the vDSO).

var monoBase int64
var monoStart time.Time

func initClock() {
	var ts syscall.Timespec
	monoStart = time.Now()
	syscall.Syscall(syscall.SYS_CLOCK_GETTIME, 1, uintptr(unsafe.Pointer(&ts)), 0)
	monoBase = ts.Nano()
}

func monoNs() int64 { return monoBase + int64(time.Since(monoStart)) }

// ---------------------------------------------------------------------------
// Histograms: histogram.py's buckets (1/64 relative precision over µs).

func bucket(us int64) int64 {
	if us < 128 {
		if us < 0 {
			return 0
		}
		return us
	}
	e := int64(bitLen(uint64(us))) - 7
	return e<<6 + us>>uint(e)
}

func bitLen(x uint64) int {
	n := 0
	for x != 0 {
		x >>= 1
		n++
	}
	return n
}

type hist map[int64]int64

func (h hist) jsonable() map[string]int64 {
	out := make(map[string]int64, len(h))
	for b, n := range h {
		out[strconv.FormatInt(b, 10)] = n
	}
	return out
}

// ---------------------------------------------------------------------------
// The plan (loadgen/plan.py's Plan, as JSON).

type pubPlan struct {
	Name  string
	Probe string // "" when the publisher is its own probe
	Room  int
}

type plan struct {
	Scenario        string          `json:"scenario"`
	Protocol        string          `json:"protocol"`
	Family          int             `json:"family"`
	Address         string          `json:"address"`
	Port            int             `json:"port"`
	HostHeader      string          `json:"host_header"`
	Paths           []string        `json:"paths"`
	SecretKey       string          `json:"secret_key"`
	Sources         []string        `json:"sources"`
	Size            int             `json:"size"`
	Window          int             `json:"window"`
	RatePerPub      float64         `json:"rate_per_publisher"`
	ConnectRate     float64         `json:"connect_rate"`
	Churn           bool            `json:"churn"`
	ConnectTimeout  float64         `json:"connect_timeout"`
	Concurrency     int             `json:"concurrency"`
	Interval        float64         `json:"interval"`
	Grace           float64         `json:"grace"`
	TLS             bool            `json:"tls"`
	WorkerIndex     int             `json:"worker_index"`
	Subscribers     [][]interface{} `json:"subscribers"`
	PublishersRaw   [][]interface{} `json:"publishers"`
	publishers      []pubPlan
	namePrefix      string
	connectTimeoutN int64
}

// ---------------------------------------------------------------------------
// Connections.

const (
	stConnecting = iota // TCP connect under way
	stHandshake         // upgrade request sent, reading the response
	stAuth              // register sent, waiting for register-ack
	stOpen              // authenticated
	stDone              // ended
)

type conn struct {
	fd       int
	name     string
	room     int
	state    int
	started  int64 // monoNs at the attempt's start
	opened   bool  // counted in stats.open
	closing  bool  // we started the close
	accept   string
	in       []byte // bytes of an incomplete frame (or response head)
	out      []byte // bytes the socket has not taken yet
	wantOut  bool   // registered for EPOLLOUT
	ackTag   []byte // frames tagged by this probe's publisher are counted
	acked    int64
	sent     int64 // as a publisher
	gotClose bool
	onDone   func(c *conn, ok bool) // the attempt's outcome, once
	reported bool
	// Over TLS (tls.go): the connection, its writer's queue, a write under way.
	nc      *tls.Conn
	wch     chan []byte
	writing bool
}

type stats struct {
	deliveries, late, publishes      int64
	connects, lateConnects, attempts int64
	open                             int64
	latency                          hist
	latencyMax                       int64
	connectLatency                   hist
	connectLatencyMax                int64
	errors                           map[string]int64
	closeCodes                       map[int]int64
	closeReasons                     map[int]string
	deadlineNs                       int64
}

type pair struct{ pub, probe *conn }

type engine struct {
	p         *plan
	ep        int
	conns     map[int]*conn
	st        stats
	out       *bufio.Writer
	rbuf      []byte
	source    int
	clients   []*conn
	connected map[int]int64
	roomPubs  map[int]int64
	pairs     []pair
	// Opening: what waits for a handshake slot, and how many are in flight.
	queue    []func()
	inFlight int
	// The parent's commands.
	stdinBuf []byte
	commands [][]interface{}
	stdinEOF bool
	tls      *tlsSide // wss (tls.go); nil for ws
}

func newEngine(p *plan) *engine {
	ep, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		fatal("epoll_create1: " + err.Error())
	}
	e := &engine{p: p, ep: ep, conns: map[int]*conn{}, out: bufio.NewWriterSize(os.Stdout, 1<<16),
		rbuf: make([]byte, 1<<16), connected: map[int]int64{}, roomPubs: map[int]int64{}}
	e.st.latency, e.st.connectLatency = hist{}, hist{}
	e.st.errors, e.st.closeCodes, e.st.closeReasons = map[string]int64{}, map[int]int64{}, map[int]string{}
	e.st.deadlineNs = math.MaxInt64
	syscall.SetNonblock(0, true)
	e.ctl(syscall.EPOLL_CTL_ADD, 0, syscall.EPOLLIN)
	return e
}

func fatal(msg string) {
	b, _ := json.Marshal([]interface{}{"crashed", msg})
	os.Stdout.Write(append(b, '\n'))
	os.Exit(1)
}

func (e *engine) report(msg ...interface{}) {
	b, err := json.Marshal(msg)
	if err != nil {
		fatal("report: " + err.Error())
	}
	e.out.Write(b)
	e.out.WriteByte('\n')
	e.out.Flush()
}

func (e *engine) errorsTotal() int64 {
	var n int64
	for _, v := range e.st.errors {
		n += v
	}
	return n
}

func (e *engine) fail(kind string) { e.st.errors[kind]++ }

func (e *engine) ctl(op, fd int, events uint32) {
	ev := syscall.EpollEvent{Events: events, Fd: int32(fd)}
	syscall.EpollCtl(e.ep, op, fd, &ev)
}

// ---------------------------------------------------------------------------
// Opening a connection: TCP connect, upgrade, register.

func (e *engine) nextSource() string {
	if len(e.p.Sources) == 0 {
		return ""
	}
	e.source++
	return e.p.Sources[e.source%len(e.p.Sources)]
}

func errnoName(err error) string {
	var en syscall.Errno
	if errors.As(err, &en) {
		switch en {
		case syscall.ECONNREFUSED:
			return "ConnectionRefusedError"
		case syscall.ECONNRESET:
			return "ConnectionResetError"
		case syscall.ETIMEDOUT:
			return "TimeoutError"
		case syscall.EADDRNOTAVAIL:
			return "OSError(EADDRNOTAVAIL)"
		case syscall.EMFILE, syscall.ENFILE:
			return "OSError(EMFILE)"
		}
		return "OSError(" + en.Error() + ")"
	}
	return err.Error()
}

// open starts one client; onDone gets its outcome once (maybe before
// open returns, if the attempt fails at once).
func (e *engine) open(name string, room int, onDone func(c *conn, ok bool)) *conn {
	c := &conn{fd: -1, name: name, room: room, started: monoNs(), onDone: onDone}
	if e.tls != nil {
		e.openTLS(c)
		return c
	}
	family := syscall.AF_INET
	if e.p.Family == int(syscall.AF_INET6) {
		family = syscall.AF_INET6
	}
	fd, err := syscall.Socket(family, syscall.SOCK_STREAM|syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		e.fail("connect: " + errnoName(err))
		e.finishAttempt(c, false)
		return c
	}
	c.fd = fd
	syscall.SetsockoptInt(fd, syscall.IPPROTO_TCP, syscall.TCP_NODELAY, 1)
	var sa syscall.Sockaddr
	if family == syscall.AF_INET {
		a := &syscall.SockaddrInet4{Port: e.p.Port}
		copy(a.Addr[:], net.ParseIP(e.p.Address).To4())
		sa = a
		if src := e.nextSource(); src != "" {
			syscall.SetsockoptInt(fd, syscall.IPPROTO_IP, 24, 1) // IP_BIND_ADDRESS_NO_PORT
			s := &syscall.SockaddrInet4{}
			copy(s.Addr[:], net.ParseIP(src).To4())
			syscall.Bind(fd, s)
		}
	} else {
		a := &syscall.SockaddrInet6{Port: e.p.Port}
		copy(a.Addr[:], net.ParseIP(e.p.Address).To16())
		sa = a
	}
	e.conns[fd] = c
	err = syscall.Connect(fd, sa)
	if err != nil && err != syscall.EINPROGRESS {
		e.fail("connect: " + errnoName(err))
		e.drop(c)
		e.finishAttempt(c, false)
		return c
	}
	c.state = stConnecting
	c.wantOut = true
	e.ctl(syscall.EPOLL_CTL_ADD, fd, syscall.EPOLLIN|syscall.EPOLLOUT|syscall.EPOLLRDHUP)
	if err == nil {
		e.connected_(c)
	}
	return c
}

// connected_: TCP is up; send the upgrade request.
func (e *engine) connected_(c *conn) {
	if v, err := syscall.GetsockoptInt(c.fd, syscall.SOL_SOCKET, syscall.SO_ERROR); err != nil || v != 0 {
		e.fail("connect: " + errnoName(syscall.Errno(v)))
		e.drop(c)
		e.finishAttempt(c, false)
		return
	}
	c.wantOut = false // connected: read, and write as data comes
	e.ctl(syscall.EPOLL_CTL_MOD, c.fd, syscall.EPOLLIN|syscall.EPOLLRDHUP)
	e.upgrade(c)
}

// upgrade sends the opening handshake's request.
func (e *engine) upgrade(c *conn) {
	key := make([]byte, 16)
	rand.Read(key)
	k := base64.StdEncoding.EncodeToString(key)
	sum := sha1.Sum([]byte(k + wsGUID))
	c.accept = base64.StdEncoding.EncodeToString(sum[:])
	req := "GET " + e.p.Paths[c.room] + " HTTP/1.1\r\nHost: " + e.p.HostHeader +
		"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: " + k +
		"\r\nSec-WebSocket-Version: 13\r\n\r\n"
	c.state = stHandshake
	e.write(c, []byte(req))
}

// handshakeReply handles the response head once complete; the rest of
// c.in are frames.
func (e *engine) handshakeReply(c *conn) bool {
	i := bytes.Index(c.in, []byte("\r\n\r\n"))
	if i < 0 {
		return false
	}
	head := string(c.in[:i])
	c.in = append([]byte(nil), c.in[i+4:]...)
	lines := strings.Split(head, "\r\n")
	if !strings.HasPrefix(lines[0], "HTTP/1.1 101") {
		status := lines[0]
		if j := strings.IndexByte(status, ' '); j >= 0 {
			status = status[j+1:]
		}
		e.fail("handshake: HTTP " + status)
		e.drop(c)
		e.finishAttempt(c, false)
		return true
	}
	accept := ""
	for _, h := range lines[1:] {
		if j := strings.IndexByte(h, ':'); j >= 0 && strings.EqualFold(strings.TrimSpace(h[:j]), "sec-websocket-accept") {
			accept = strings.TrimSpace(h[j+1:])
		}
	}
	if accept != c.accept {
		e.fail("handshake: wrong Sec-WebSocket-Accept")
		e.drop(c)
		e.finishAttempt(c, false)
		return true
	}
	c.opened = true
	e.st.open++
	c.state = stAuth
	reg, _ := json.Marshal(map[string]string{"action": "register", "client-name": c.name,
		"secret-key": e.p.SecretKey})
	e.write(c, clientFrame(reg, 1))
	return true
}

func (e *engine) finishAttempt(c *conn, ok bool) {
	if c.reported {
		return
	}
	c.reported = true
	if ok {
		us := (monoNs() - c.started) / 1000
		e.st.connectLatency[bucket(us)]++
		if us > e.st.connectLatencyMax {
			e.st.connectLatencyMax = us
		}
		if monoNs() < e.st.deadlineNs {
			e.st.connects++
		} else {
			e.st.lateConnects++
		}
		e.clients = append(e.clients, c)
		e.connected[c.room]++
	}
	if c.onDone != nil {
		c.onDone(c, ok)
	}
}

// ---------------------------------------------------------------------------
// Frames.

func clientFrame(payload []byte, opcode byte) []byte {
	n := len(payload)
	var f []byte
	switch {
	case n < 126:
		f = make([]byte, 2, 6+n)
		f[1] = 0x80 | byte(n)
	case n < 1<<16:
		f = make([]byte, 4, 8+n)
		f[1] = 0x80 | 126
		binary.BigEndian.PutUint16(f[2:], uint16(n))
	default:
		f = make([]byte, 10, 14+n)
		f[1] = 0x80 | 127
		binary.BigEndian.PutUint64(f[2:], uint64(n))
	}
	f[0] = 0x80 | opcode
	var key [4]byte
	rand.Read(key[:])
	f = append(f, key[:]...)
	start := len(f)
	f = append(f, payload...)
	for i := range payload {
		f[start+i] ^= key[i&3]
	}
	return f
}

func closePayload(code int) []byte { return []byte{byte(code >> 8), byte(code)} }

// scan handles each complete frame in buf; returns the bytes used.
func (e *engine) scan(c *conn, buf []byte, now int64) int {
	st := &e.st
	pos, delivered := 0, int64(0)
	n := len(buf)
	for n-pos >= 2 {
		length := int(buf[pos+1] & 0x7f)
		start := pos + 2
		if length == 126 {
			if n-pos < 4 {
				break
			}
			length = int(binary.BigEndian.Uint16(buf[pos+2:]))
			start = pos + 4
		} else if length == 127 {
			if n-pos < 10 {
				break
			}
			length = int(binary.BigEndian.Uint64(buf[pos+2:]))
			start = pos + 10
		}
		end := start + length
		if end > n {
			break
		}
		opcode := buf[pos] & 0x0f
		pos = end
		payload := buf[start:end]
		switch {
		case opcode <= 1:
			i := bytes.Index(payload, mark)
			if i < 0 || len(payload) < i+22 {
				e.control(c, payload)
				continue
			}
			delivered++
			var sent int64
			for _, d := range payload[i+3 : i+22] {
				sent = sent*10 + int64(d-'0')
			}
			us := (now - sent) / 1000
			st.latency[bucket(us)]++
			if us > st.latencyMax {
				st.latencyMax = us
			}
			if c.ackTag != nil && len(payload) >= i+23 && bytes.HasPrefix(payload[i+23:], c.ackTag) {
				c.acked++
			}
		case opcode == 8:
			code := 1005
			reason := ""
			if len(payload) >= 2 {
				code = int(binary.BigEndian.Uint16(payload))
				reason = string(payload[2:])
			}
			if !c.closing {
				e.recordClose(c, code, reason)
				echo := code
				if echo == 1005 {
					echo = 1000
				}
				e.write(c, clientFrame(closePayload(echo), 8))
			}
			c.gotClose = true
			e.ended(c, "closed "+strconv.Itoa(code)+" "+reason)
			return pos
		case opcode == 9:
			e.write(c, clientFrame(append([]byte(nil), payload...), 10))
		}
	}
	if now < st.deadlineNs {
		st.deliveries += delivered
	} else {
		st.late += delivered
	}
	return pos
}

// control: a frame without the marker; only the auth answer matters.
func (e *engine) control(c *conn, payload []byte) {
	if c.state == stAuth && bytes.Contains(payload, []byte(`"register-ack"`)) {
		c.state = stOpen
		e.finishAttempt(c, true)
	}
}

func (e *engine) recordClose(c *conn, code int, reason string) {
	e.st.closeCodes[code]++
	if _, ok := e.st.closeReasons[code]; !ok {
		e.st.closeReasons[code] = reason
	}
}

// ended: no more frames will come from c.
func (e *engine) ended(c *conn, info string) {
	if c.state == stDone {
		return
	}
	wasAuth := c.state == stAuth || c.state == stHandshake || c.state == stConnecting
	c.state = stDone
	if c.opened {
		c.opened = false
		e.st.open--
	}
	if wasAuth && !c.reported {
		if c.closing {
			e.finishAttempt(c, false)
		} else {
			e.fail("auth: " + strings.TrimSpace(info))
			e.finishAttempt(c, false)
		}
	}
	if len(c.out) == 0 {
		e.drop(c)
	}
}

// drop closes the socket.
func (e *engine) drop(c *conn) {
	if e.tls != nil && c.fd >= 0 {
		e.dropTLS(c)
	}
	if c.fd >= 0 {
		if e.conns[c.fd] == c {
			delete(e.conns, c.fd)
			e.ctl(syscall.EPOLL_CTL_DEL, c.fd, 0)
		}
		syscall.Close(c.fd)
		c.fd = -1
	}
	if c.state != stDone {
		c.state = stDone
		if c.opened {
			c.opened = false
			e.st.open--
		}
	}
}

// write sends data now as far as the socket takes it; the rest waits for EPOLLOUT.
func (e *engine) write(c *conn, data []byte) {
	if c.fd < 0 {
		return
	}
	if e.tls != nil {
		e.writeTLS(c, data)
		return
	}
	if len(c.out) > 0 {
		c.out = append(c.out, data...)
		return
	}
	for len(data) > 0 {
		n, err := syscall.Write(c.fd, data)
		if err == syscall.EAGAIN {
			break
		}
		if err != nil {
			e.lost(c, "connection lost")
			return
		}
		data = data[n:]
	}
	if len(data) > 0 {
		c.out = append(c.out[:0], data...)
		if !c.wantOut {
			c.wantOut = true
			e.ctl(syscall.EPOLL_CTL_MOD, c.fd, syscall.EPOLLIN|syscall.EPOLLOUT|syscall.EPOLLRDHUP)
		}
	}
}

func (e *engine) flush(c *conn) {
	for len(c.out) > 0 {
		n, err := syscall.Write(c.fd, c.out)
		if err == syscall.EAGAIN {
			return
		}
		if err != nil {
			c.out = nil
			e.lost(c, "connection lost")
			return
		}
		c.out = c.out[n:]
	}
	c.out = nil
	if c.state == stDone {
		e.drop(c)
		return
	}
	c.wantOut = false
	e.ctl(syscall.EPOLL_CTL_MOD, c.fd, syscall.EPOLLIN|syscall.EPOLLRDHUP)
}

func (e *engine) lost(c *conn, reason string) {
	if !c.closing && c.state != stDone {
		e.recordClose(c, 1006, reason)
	}
	e.ended(c, "closed 1006 "+reason)
	c.out = nil
	e.drop(c)
}

// ---------------------------------------------------------------------------
// The loop.

// poll waits for sockets or the parent until wakeNs (monoNs), then handles them.
func (e *engine) poll(wakeNs int64) {
	if e.tls != nil {
		e.pollTLS(wakeNs)
		return
	}
	var events [1024]syscall.EpollEvent
	timeout := -1
	if wakeNs != math.MaxInt64 {
		d := wakeNs - monoNs()
		if d <= 0 {
			timeout = 0
		} else {
			timeout = int((d + 999_999) / 1_000_000)
		}
	}
	n, err := syscall.EpollWait(e.ep, events[:], timeout)
	if err != nil && err != syscall.EINTR {
		fatal("epoll_wait: " + err.Error())
	}
	now := monoNs()
	for i := 0; i < n; i++ {
		fd := int(events[i].Fd)
		ev := events[i].Events
		if fd == 0 {
			e.readStdin()
			continue
		}
		c := e.conns[fd]
		if c == nil {
			continue
		}
		if c.state == stConnecting {
			if ev&(syscall.EPOLLOUT|syscall.EPOLLERR|syscall.EPOLLHUP) != 0 {
				e.connected_(c)
			}
			continue
		}
		if ev&syscall.EPOLLOUT != 0 && len(c.out) > 0 {
			e.flush(c)
			if c.fd < 0 {
				continue
			}
		}
		if ev&(syscall.EPOLLIN|syscall.EPOLLRDHUP|syscall.EPOLLHUP|syscall.EPOLLERR) != 0 {
			e.readConn(c, now)
		}
	}
}

func (e *engine) readConn(c *conn, now int64) {
	k, err := syscall.Read(c.fd, e.rbuf)
	if err == syscall.EAGAIN {
		return
	}
	if err != nil {
		e.lost(c, "connection lost")
		return
	}
	if k == 0 {
		if c.gotClose || c.closing {
			e.ended(c, "closed")
			e.drop(c)
			return
		}
		e.lost(c, "closed without a close frame")
		return
	}
	e.onData(c, e.rbuf[:k], now)
}

// onData handles bytes read from c at now (monoNs).
func (e *engine) onData(c *conn, data []byte, now int64) {
	if c.state == stDone {
		return
	}
	if c.state == stHandshake {
		c.in = append(c.in, data...)
		if !e.handshakeReply(c) || c.state == stDone {
			return
		}
		data, c.in = c.in, nil
	} else if len(c.in) > 0 {
		data = append(c.in, data...)
		c.in = nil
	}
	if c.state == stDone {
		return
	}
	used := e.scan(c, data, now)
	if used < len(data) && c.state != stDone {
		c.in = append([]byte(nil), data[used:]...)
	}
}

func (e *engine) readStdin() {
	var buf [65536]byte
	for {
		n, err := syscall.Read(0, buf[:])
		if n > 0 {
			e.stdinBuf = append(e.stdinBuf, buf[:n]...)
		}
		if err == syscall.EAGAIN {
			break
		}
		if n == 0 || (err != nil && err != syscall.EINTR) {
			e.stdinEOF = true
			e.ctl(syscall.EPOLL_CTL_DEL, 0, 0)
			break
		}
	}
	e.parseCommands()
}

func (e *engine) parseCommands() {
	for {
		i := bytes.IndexByte(e.stdinBuf, '\n')
		if i < 0 {
			break
		}
		var cmd []interface{}
		if json.Unmarshal(e.stdinBuf[:i], &cmd) == nil && len(cmd) > 0 {
			e.commands = append(e.commands, cmd)
		}
		e.stdinBuf = e.stdinBuf[i+1:]
	}
}

// nextCommand runs the loop until the parent sends a command.
func (e *engine) nextCommand() []interface{} {
	for len(e.commands) == 0 {
		if e.stdinEOF {
			os.Exit(0) // the parent is gone
		}
		e.poll(math.MaxInt64)
	}
	cmd := e.commands[0]
	e.commands = e.commands[1:]
	return cmd
}

// ---------------------------------------------------------------------------
// Phases.

// openMany opens every (name, room) with at most Concurrency handshakes in
// flight, a connect timeout each; returns the clients (nil: failed).
func (e *engine) openMany(wanted []struct {
	name string
	room int
}) []*conn {
	result := make([]*conn, len(wanted))
	var pending fifo
	inFlight, next, left := 0, 0, len(wanted)
	reportAt := monoNs() + 250_000_000
	timeout := int64(e.p.ConnectTimeout * 1e9)
	for left > 0 {
		for next < len(wanted) && inFlight < e.p.Concurrency {
			i := next
			next++
			inFlight++
			c := e.open(wanted[i].name, wanted[i].room, func(c *conn, ok bool) {
				inFlight--
				left--
				if ok {
					result[i] = c
				}
			})
			pending.push(c)
		}
		if left == 0 {
			break
		}
		wake := minInt(reportAt, e.expire(&pending, timeout))
		e.poll(wake)
		if monoNs() >= reportAt {
			reportAt = monoNs() + 250_000_000
			e.report("setup", e.st.open, e.errorsTotal())
		}
	}
	return result
}

// fifo holds attempts in the order they started, so the oldest times out first.
type fifo struct {
	items []*conn
	head  int
}

func (f *fifo) push(c *conn) {
	if !c.reported {
		f.items = append(f.items, c)
	}
}

// expire times out the attempts older than timeout; the time the next one
// would (math.MaxInt64 if none waits).
func (e *engine) expire(f *fifo, timeout int64) int64 {
	now := monoNs()
	for f.head < len(f.items) {
		c := f.items[f.head]
		if !c.reported && now-c.started < timeout {
			return c.started + timeout
		}
		if !c.reported {
			e.timeout(c)
		}
		f.items[f.head] = nil
		f.head++
		if f.head > 4096 && f.head*2 > len(f.items) {
			f.items, f.head = append([]*conn(nil), f.items[f.head:]...), 0
		}
	}
	return math.MaxInt64
}

func (f *fifo) waiting() bool {
	for f.head < len(f.items) && f.items[f.head].reported {
		f.items[f.head] = nil
		f.head++
	}
	return f.head < len(f.items)
}

func (e *engine) timeout(c *conn) {
	if c.reported {
		return
	}
	e.fail(fmt.Sprintf("timeout: connect and auth took over %gs", e.p.ConnectTimeout))
	c.closing = true
	e.finishAttempt(c, false)
	e.drop(c)
}

func (e *engine) connectPhase() {
	if e.p.Scenario == "connect" {
		return
	}
	wanted := make([]struct {
		name string
		room int
	}, len(e.p.Subscribers))
	for i, s := range e.p.Subscribers {
		wanted[i].name = s[0].(string)
		wanted[i].room = int(s[1].(float64))
	}
	e.openMany(wanted)
}

func (e *engine) preparePhase() {
	if len(e.p.publishers) == 0 {
		return
	}
	var wanted []struct {
		name string
		room int
	}
	for _, pp := range e.p.publishers {
		wanted = append(wanted, struct {
			name string
			room int
		}{pp.Name, pp.Room})
		if pp.Probe != "" {
			wanted = append(wanted, struct {
				name string
				room int
			}{pp.Probe, pp.Room})
		}
	}
	opened := e.openMany(wanted)
	k := 0
	for _, pp := range e.p.publishers {
		pub := opened[k]
		k++
		probe := pub
		if pp.Probe != "" {
			probe = opened[k]
			k++
		}
		if pub != nil && probe != nil {
			probe.ackTag = []byte(pub.name + ":")
			e.pairs = append(e.pairs, pair{pub, probe})
		}
	}
}

type cpuTimes struct{ user, system float64 }

func rusage() cpuTimes {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return cpuTimes{float64(ru.Utime.Nano()) / 1e9, float64(ru.Stime.Nano()) / 1e9}
}

type sampler struct {
	e     *engine
	start int64
	k     int
	last  [5]int64
}

func (s *sampler) due() int64 {
	return s.start + int64(float64(s.k+1)*s.e.p.Interval*1e9)
}

func (s *sampler) tick() {
	for monoNs() >= s.due() {
		s.k++
		st := &s.e.st
		now := [5]int64{st.deliveries, st.late, st.publishes, st.connects + st.lateConnects,
			s.e.errorsTotal()}
		s.e.report("sample", s.k, map[string]interface{}{
			"deliveries": now[0] - s.last[0] + now[1] - s.last[1],
			"publishes":  now[2] - s.last[2], "connects": now[3] - s.last[3],
			"errors": now[4] - s.last[4], "open": st.open,
			"latency": st.latency.jsonable(), "connect_latency": st.connectLatency.jsonable()})
		st.latency, st.connectLatency = hist{}, hist{}
		s.last = now
	}
}

// messageContent: MARK + 19-digit send time + ":" + tag + ":", padded to size.
func messageContent(tag string, size int) []byte {
	head := fmt.Sprintf("~lt%019d:%s:", monoNs(), tag)
	if size > len(head) {
		return append([]byte(head), bytes.Repeat([]byte("x"), size-len(head))...)
	}
	return []byte(head)
}

func (e *engine) publishFrame(tag string) []byte {
	var b bytes.Buffer
	b.WriteString(`{"action":"client-message","content":"`)
	b.Write(messageContent(tag, e.p.Size))
	b.WriteString(`"}`)
	return clientFrame(b.Bytes(), 1)
}

func (e *engine) runPhase(startS, deadlineS float64, smp *sampler) {
	start, deadline := int64(startS*1e9), int64(deadlineS*1e9)
	for monoNs() < start {
		e.poll(start)
	}
	e.st.deadlineNs = deadline
	e.st.connects, e.st.connectLatency, e.st.connectLatencyMax = 0, hist{}, 0
	cpu0 := rusage()
	smp.start, smp.k, smp.last = start, 0, [5]int64{0, 0, 0, 0, e.errorsTotal()}
	switch e.p.Scenario {
	case "fanout", "rooms":
		e.publish(start, deadline, smp)
	case "connect":
		e.storm(start, deadline, smp)
	default:
		for monoNs() < deadline {
			e.poll(minInt(deadline, smp.due()))
			smp.tick()
		}
	}
	cpu1 := rusage()
	e.report("ran", map[string]float64{"user": cpu1.user - cpu0.user,
		"system": cpu1.system - cpu0.system, "seconds": float64(monoNs()-start) / 1e9})
}

func minInt(a, b int64) int64 {
	if a < b {
		return a
	}
	return b
}

func (e *engine) publish(start, deadline int64, smp *sampler) {
	rate, window := e.p.RatePerPub, int64(e.p.Window)
	for {
		now := monoNs()
		if now >= deadline {
			break
		}
		wake := minInt(deadline, smp.due())
		for _, pr := range e.pairs {
			pub, probe := pr.pub, pr.probe
			if pub.state != stOpen || probe.state != stOpen || len(pub.out) > 0 || pub.writing {
				continue
			}
			room := window - (pub.sent - probe.acked)
			due := room
			if rate > 0 {
				due = int64(float64(now-start)/1e9*rate) + 1 - pub.sent
			}
			n := due
			if room < n {
				n = room
			}
			if n > 0 {
				var frames []byte
				for j := int64(0); j < n; j++ {
					frames = append(frames, e.publishFrame(pub.name)...)
				}
				e.write(pub, frames)
				pub.sent += n
				e.st.publishes += n
				e.roomPubs[pub.room] += n
			} else if rate > 0 && due <= 0 {
				at := start + int64(float64(pub.sent)/rate*1e9)
				if at < wake {
					wake = at
				}
			}
		}
		e.poll(wake)
		smp.tick()
	}
	// Drain: each probe sees everything its publisher sent, within grace.
	graceEnd := monoNs() + int64(e.p.Grace*1e9)
	for monoNs() < graceEnd {
		waiting := false
		for _, pr := range e.pairs {
			if pr.probe.acked < pr.pub.sent && pr.probe.state == stOpen {
				waiting = true
			}
		}
		if !waiting {
			break
		}
		e.poll(minInt(graceEnd, smp.due()))
		smp.tick()
	}
}

func (e *engine) storm(start, deadline int64, smp *sampler) {
	rate := e.p.ConnectRate
	total := int64(0)
	if rate > 0 {
		total = int64(math.Ceil(float64(deadline-start) / 1e9 * rate))
	}
	prefix := e.p.namePrefix
	var pending fifo
	timeout := int64(e.p.ConnectTimeout * 1e9)
	var k int64
	for {
		now := monoNs()
		for k < total && start+int64(float64(k)/rate*1e9) <= now {
			e.st.attempts++
			name := prefix + "c" + strconv.FormatInt(k, 10)
			k++
			pending.push(e.open(name, 0, func(c *conn, ok bool) {
				if ok && e.p.Churn {
					e.closeConn(c)
				}
			}))
		}
		if now >= deadline && !pending.waiting() {
			break
		}
		wake := minInt(smp.due(), e.expire(&pending, timeout))
		if k < total {
			wake = minInt(wake, start+int64(float64(k)/rate*1e9))
		} else if now < deadline {
			wake = minInt(wake, deadline)
		}
		e.poll(wake)
		smp.tick()
	}
}

// closeConn starts the close handshake (the server closes TCP first).
func (e *engine) closeConn(c *conn) {
	if c.closing || c.state == stDone {
		c.closing = true
		return
	}
	c.closing = true
	e.write(c, clientFrame(closePayload(1000), 8))
}

func (e *engine) finish(smp *sampler) {
	st := &e.st
	codes := map[string]int64{}
	for c, n := range st.closeCodes {
		codes[strconv.Itoa(c)] = n
	}
	reasons := map[string]string{}
	for c, r := range st.closeReasons {
		reasons[strconv.Itoa(c)] = r
	}
	connected := map[string]int64{}
	for r, n := range e.connected {
		connected[strconv.Itoa(r)] = n
	}
	roomPubs := map[string]int64{}
	for r, n := range e.roomPubs {
		roomPubs[strconv.Itoa(r)] = n
	}
	cpu := rusage()
	e.report("final", map[string]interface{}{
		"deliveries": st.deliveries, "late": st.late, "publishes": st.publishes,
		"connects": st.connects, "late_connects": st.lateConnects, "attempts": st.attempts,
		"open": st.open, "latency": st.latency.jsonable(), "latency_max": st.latencyMax,
		"connect_latency": st.connectLatency.jsonable(), "connect_latency_max": st.connectLatencyMax,
		"errors": st.errors, "close_codes": codes, "close_reasons": reasons,
		"connected": connected, "room_publishes": roomPubs, "cpu_total": cpu.user + cpu.system})
	for _, c := range e.clients {
		e.closeConn(c)
	}
	end := monoNs() + 5_000_000_000
	for monoNs() < end && len(e.conns) > 0 {
		e.poll(end)
	}
	for _, c := range e.conns {
		e.drop(c)
	}
}

func main() {
	signal.Ignore(syscall.SIGINT, syscall.SIGTERM) // the parent stops us
	initClock()
	rand.Seed(time.Now().UnixNano()) // masks and handshake keys need not be secret here
	reader := bufio.NewReaderSize(os.Stdin, 1<<20)
	line, err := reader.ReadBytes('\n')
	if err != nil {
		fatal("no plan on stdin")
	}
	early, _ := reader.Peek(reader.Buffered()) // commands sent with the plan
	p := &plan{}
	if err := json.Unmarshal(line, p); err != nil {
		fatal("plan: " + err.Error())
	}
	for _, raw := range p.PublishersRaw {
		pp := pubPlan{Name: raw[0].(string), Room: int(raw[2].(float64))}
		if s, ok := raw[1].(string); ok {
			pp.Probe = s
		}
		p.publishers = append(p.publishers, pp)
	}
	p.namePrefix = fmt.Sprintf("lt%dw%d", os.Getpid()%100000, p.WorkerIndex)
	if p.Concurrency < 1 {
		p.Concurrency = 1
	}
	e := newEngine(p)
	e.stdinBuf = append(e.stdinBuf, early...)
	if p.TLS {
		e.startTLS()
		e.parseCommands()
	} else {
		e.readStdin()
	}
	smp := &sampler{e: e, start: math.MaxInt64 / 2}
	for {
		cmd := e.nextCommand()
		kind, _ := cmd[0].(string)
		switch kind {
		case "connect":
			e.connectPhase()
		case "prepare":
			e.preparePhase()
		case "run":
			e.runPhase(cmd[1].(float64), cmd[2].(float64), smp)
			continue
		case "finish":
			smp.tick()
			e.finish(smp)
			e.out.Flush()
			os.Exit(0)
		default:
			fatal("unknown command " + kind)
		}
		e.report("done", kind, e.st.open, e.errorsTotal())
	}
}
