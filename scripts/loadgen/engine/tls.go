// wss: the same engine over TLS (loadtest.py --tls).
//
// TLS records cannot be read from a raw non-blocking fd without a TLS
// library driving them, so over TLS each connection is a crypto/tls
// client on Go's own network poller (itself one epoll loop on this one
// thread, GOMAXPROCS=1): a reader goroutine per connection hands each
// read to the engine's loop over one channel (with its arrival time), a
// writer goroutine writes what the loop queued. Everything else (frames,
// counting, phases) is the plain engine's: the loop stays the only owner
// of the engine's state.
package main

import (
	"crypto/tls"
	"net"
	"strconv"
	"syscall"
	"time"
)

type tlsSide struct {
	events chan func()
	timer  *time.Timer
	nextID int
}

func (e *engine) startTLS() {
	e.tls = &tlsSide{events: make(chan func(), 1<<16), timer: time.NewTimer(time.Hour), nextID: 1 << 30}
	e.tls.timer.Stop()
	e.ctl(syscall.EPOLL_CTL_DEL, 0, 0) // stdin: read by a goroutine instead
	syscall.SetNonblock(0, false)
	go func() {
		var buf [65536]byte
		for {
			n, err := syscall.Read(0, buf[:])
			if n > 0 {
				data := append([]byte(nil), buf[:n]...)
				e.tls.events <- func() {
					e.stdinBuf = append(e.stdinBuf, data...)
					e.parseCommands()
				}
			}
			if n == 0 || (err != nil && err != syscall.EINTR && err != syscall.EAGAIN) {
				e.tls.events <- func() { e.stdinEOF = true }
				return
			}
		}
	}()
}

// pollTLS runs what the goroutines handed over until wakeNs (monoNs).
func (e *engine) pollTLS(wakeNs int64) {
	t := e.tls
	var f func()
	if wakeNs == int64(^uint64(0)>>1) {
		f = <-t.events
	} else {
		d := wakeNs - monoNs()
		if d > 0 {
			t.timer.Reset(time.Duration(d))
			select {
			case f = <-t.events:
				if !t.timer.Stop() {
					<-t.timer.C
				}
			case <-t.timer.C:
			}
		}
	}
	for n := 0; f != nil && n < 4096; n++ {
		f()
		select {
		case f = <-t.events:
		default:
			f = nil
		}
	}
}

// openTLS: TCP connect and TLS handshake in a goroutine, then the upgrade.
func (e *engine) openTLS(c *conn) {
	t := e.tls
	t.nextID++
	c.fd = t.nextID
	e.conns[c.fd] = c
	c.state = stConnecting
	dialer := &net.Dialer{Timeout: time.Duration(e.p.ConnectTimeout * float64(time.Second))}
	if src := e.nextSource(); src != "" {
		dialer.LocalAddr = &net.TCPAddr{IP: net.ParseIP(src)}
	}
	address := net.JoinHostPort(e.p.Address, strconv.Itoa(e.p.Port))
	go func() {
		raw, err := dialer.Dial("tcp", address)
		var nc *tls.Conn
		if err == nil {
			raw.(*net.TCPConn).SetNoDelay(true)
			nc = tls.Client(raw, &tls.Config{InsecureSkipVerify: true, // loopback, self-signed
				NextProtos: []string{"http/1.1"}})
			if err = nc.Handshake(); err != nil {
				raw.Close()
			}
		}
		t.events <- func() {
			if c.state == stDone { // timed out meanwhile
				if nc != nil {
					nc.Close()
				}
				return
			}
			if err != nil {
				e.fail("connect: " + errnoName(err))
				e.drop(c)
				e.finishAttempt(c, false)
				return
			}
			c.nc = nc
			c.wch = make(chan []byte, 1)
			go e.tlsWriter(c, nc, c.wch)
			go e.tlsReader(c, nc)
			e.upgrade(c)
		}
	}()
}

func (e *engine) tlsReader(c *conn, nc *tls.Conn) {
	for {
		buf := make([]byte, 65536)
		n, err := nc.Read(buf)
		now := monoNs()
		if n > 0 {
			data := buf[:n]
			e.tls.events <- func() { e.onData(c, data, now) }
		}
		if err != nil {
			e.tls.events <- func() {
				if c.gotClose || c.closing {
					e.ended(c, "closed")
					e.drop(c)
				} else {
					e.lost(c, "closed without a close frame")
				}
			}
			return
		}
	}
}

func (e *engine) tlsWriter(c *conn, nc *tls.Conn, wch chan []byte) {
	for data := range wch {
		_, err := nc.Write(data)
		e.tls.events <- func() {
			c.writing = false
			if err != nil {
				e.lost(c, "connection lost")
				return
			}
			if len(c.out) > 0 && c.wch != nil {
				c.writing = true
				c.wch <- c.out
				c.out = nil
			}
		}
		if err != nil {
			return
		}
	}
}

// writeTLS queues data for c's writer goroutine.
func (e *engine) writeTLS(c *conn, data []byte) {
	if c.wch == nil {
		return
	}
	if c.writing {
		c.out = append(c.out, data...)
		return
	}
	c.writing = true
	c.wch <- data
}

func (e *engine) dropTLS(c *conn) {
	delete(e.conns, c.fd)
	c.fd = -1
	if c.nc != nil {
		c.nc.Close()
	}
	if c.wch != nil {
		close(c.wch)
		c.wch = nil
	}
}
