use serde_json::{json, Value};

use super::*;

fn code(line: &str) -> ErrorCode {
    parse_request(line.as_bytes()).unwrap_err().1.code
}

#[test]
fn every_method_name_parses_to_its_variant() {
    for m in Call::METHODS {
        let line = json!({"v": 1, "id": 1, "method": m, "params": {}}).to_string();
        match parse_request(line.as_bytes()) {
            Ok(req) => assert_eq!(req.call.method(), *m),
            // Methods with required parameters: refused for them, not as unknown.
            Err((_, e)) => assert_eq!(e.code, ErrorCode::BadRequest, "{m}: {e}"),
        }
    }
}

#[test]
fn request_line_round_trips() {
    let calls = [
        Call::VolumeCreate(VolumeCreate {
            name: "vm1".into(),
            image: Some("debian".into()),
            size: Some(Size(20 << 30)),
            full: true,
        }),
        Call::ExportStart(ExportStart {
            volume: "vm1".into(),
            socket: Some("/run/vm1.sock".into()),
            queues: Some(2),
            readonly: true,
            serial: Some("abc".into()),
        }),
        Call::ImageList(NoParams {}),
        Call::Version(NoParams {}),
    ];
    for call in calls {
        let line = request_line(&json!(7), &call, true);
        assert!(line.ends_with('\n'));
        let req = parse_request(line.trim_end().as_bytes()).unwrap();
        assert_eq!(req.call, call);
        assert_eq!(req.id, json!(7));
        assert!(req.progress);
    }
}

#[test]
fn envelope_errors() {
    assert_eq!(code("{"), ErrorCode::BadJson);
    assert_eq!(code("[1]"), ErrorCode::BadRequest);
    assert_eq!(
        code(r#"{"id":1,"method":"version"}"#),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(r#"{"v":2,"id":1,"method":"version"}"#),
        ErrorCode::UnsupportedVersion
    );
    assert_eq!(
        code(r#"{"v":"1","id":1,"method":"version"}"#),
        ErrorCode::BadRequest
    );
    assert_eq!(code(r#"{"v":1,"id":1}"#), ErrorCode::BadRequest);
    assert_eq!(
        code(r#"{"v":1,"id":1,"method":"nope"}"#),
        ErrorCode::UnknownMethod
    );
    assert_eq!(
        code(r#"{"v":1,"id":1,"method":"version","extra":1}"#),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(r#"{"v":1,"id":1,"method":"version","params":[]}"#),
        ErrorCode::BadRequest
    );
    let (id, _) = parse_request(br#"{"v":1,"id":"x","method":"nope"}"#).unwrap_err();
    assert_eq!(id, json!("x"));
}

#[test]
fn params_errors() {
    let req = |method: &str, params: Value| {
        json!({"v": 1, "id": 1, "method": method, "params": params}).to_string()
    };
    assert_eq!(
        code(&req("image.list", json!({"all": true}))),
        ErrorCode::BadRequest
    );
    assert_eq!(code(&req("volume.show", json!({}))), ErrorCode::BadRequest);
    assert_eq!(
        code(&req("volume.show", json!({"name": 5}))),
        ErrorCode::BadRequest
    );
    for bad in ["a/b", "..", "a..b", "", ".hidden", "sp ace"] {
        assert_eq!(
            code(&req("volume.show", json!({ "name": bad }))),
            ErrorCode::BadName,
            "{bad:?}"
        );
    }
    assert_eq!(
        code(&req("image.import", json!({"file": "relative.img"}))),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(&req(
            "image.fetch",
            json!({"url": "http://x/a", "sha256": "abc"})
        )),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(&req("volume.create", json!({"name": "a", "full": true}))),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(&req("volume.create", json!({"name": "a"}))),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(&req("volume.create", json!({"name": "a", "size": 1000}))),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(&req("export.start", json!({"volume": "a", "queues": 0}))),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(&req(
            "export.start",
            json!({"volume": "a", "serial": "012345678901234567890"})
        )),
        ErrorCode::BadRequest
    );
    let ok = parse_request(req("volume.create", json!({"name": "a", "size": "1G"})).as_bytes());
    assert!(ok.is_ok());
}

#[test]
fn every_call_has_a_shape_and_version_decodes() {
    let v = Response::decode(
        &Call::Version(NoParams {}),
        json!({"protocol": 1, "vdisk": "0.1.0", "later": "ignored"}),
    )
    .unwrap();
    assert_eq!(v.shape(), Shape::Version);
    let d = Response::decode(
        &Call::ExportStop(ExportRef { volume: "a".into() }),
        json!({}),
    );
    assert_eq!(d.unwrap(), Response::Done(Done {}));
}

#[test]
fn lines_parse_back() {
    let r = result_line(&json!(3), &Response::Done(Done {}));
    assert_eq!(r, "{\"v\":1,\"id\":3,\"result\":{}}\n");
    assert_eq!(
        parse_incoming(r.as_bytes()).unwrap(),
        Incoming::Result {
            id: json!(3),
            result: json!({})
        }
    );
    let e = error_line(&Value::Null, &ApiError::new(ErrorCode::TooLarge, "big"));
    assert_eq!(
        e,
        "{\"v\":1,\"id\":null,\"error\":{\"code\":\"too_large\",\"message\":\"big\"}}\n"
    );
    let p = progress_line(
        &json!(1),
        &Progress {
            done: 5,
            total: Some(10),
        },
    );
    assert!(matches!(
        parse_incoming(p.as_bytes()).unwrap(),
        Incoming::Progress { .. }
    ));
    let ev = event_line(&Event {
        at: 9,
        kind: EventKind::VolumeCreated { name: "a".into() },
    });
    assert_eq!(
        ev,
        "{\"v\":1,\"event\":{\"at\":9,\"type\":\"volume.created\",\"name\":\"a\"}}\n"
    );
    let back: Event = match parse_incoming(ev.as_bytes()).unwrap() {
        Incoming::Event(v) => serde_json::from_value(v).unwrap(),
        other => panic!("{other:?}"),
    };
    assert_eq!(back.kind, EventKind::VolumeCreated { name: "a".into() });
}

#[test]
fn error_codes_serialise_as_their_names() {
    let all = [
        ErrorCode::BadJson,
        ErrorCode::BadRequest,
        ErrorCode::UnknownMethod,
        ErrorCode::UnsupportedVersion,
        ErrorCode::TooLarge,
        ErrorCode::BadName,
        ErrorCode::PermissionDenied,
        ErrorCode::NotFound,
        ErrorCode::Exists,
        ErrorCode::InUse,
        ErrorCode::NoSpace,
        ErrorCode::BadDigest,
        ErrorCode::Io,
        ErrorCode::Internal,
    ];
    for c in all {
        assert_eq!(serde_json::to_value(c).unwrap(), json!(c.as_str()));
    }
}

mod prop {
    use proptest::prelude::*;
    use serde_json::{json, Value};

    use super::super::*;

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            "[a-z0-9./:_ -]{0,12}".prop_map(Value::from),
            Just(json!("/abs/path.img")),
            Just(json!("1G")),
            Just(json!([1, 2])),
            Just(json!({"a": 1})),
        ]
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_request(&bytes);
        }

        /// Whatever the parameters, a known method is either accepted or
        /// refused as a bad request or a bad name, never anything else.
        #[test]
        fn random_params_are_refused_cleanly(
            method in proptest::sample::select(Call::METHODS),
            params in proptest::collection::btree_map(
                prop_oneof![
                    Just("name".to_string()), Just("image".to_string()),
                    Just("file".to_string()), Just("size".to_string()),
                    Just("volume".to_string()), Just("full".to_string()),
                    "[a-z]{1,6}",
                ],
                value(),
                0..4,
            ),
        ) {
            let line = json!({"v": 1, "id": 1, "method": method, "params": params}).to_string();
            match parse_request(line.as_bytes()) {
                Ok(req) => prop_assert_eq!(req.call.method(), method),
                Err((id, e)) => {
                    prop_assert_eq!(id, json!(1));
                    prop_assert!(
                        matches!(e.code, ErrorCode::BadRequest | ErrorCode::BadName),
                        "{}", e
                    );
                }
            }
        }
    }
}
